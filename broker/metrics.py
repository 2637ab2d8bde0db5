"""Prometheus metrics: request, upstream and money counters (any process), and gauges read at scrape time."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REQUESTS = Counter("broker_requests_total", "HTTP requests by route and status", ["route", "status"])
LATENCY = Histogram(
    "broker_request_seconds",
    "HTTP request latency by route (to the first byte for streams)",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_ERRORS = Counter(
    "broker_upstream_errors_total", "Provider failures by provider and error code", ["provider", "code"]
)
CREDITS_CHARGED = Counter("broker_credits_charged_ucr_total", "Micro-credits charged", ["kind"])
JOB_OUTCOMES = Counter("broker_job_outcomes_total", "Media jobs finished, by type and outcome", ["type", "outcome"])


class LiveState:
    """Gauges that are read when scraped: open holds and queue depths (Redis), jobs by status (SQL)."""

    def __init__(self, read) -> None:
        self.read = read

    def collect(self):
        state = self.read()
        holds = GaugeMetricFamily("broker_open_holds", "Credit holds not yet settled or released")
        holds.add_metric([], state["open_holds"])
        yield holds
        queues = GaugeMetricFamily("broker_queue_depth", "Jobs waiting in each RQ queue", labels=["queue"])
        for name, depth in state["queues"].items():
            queues.add_metric([name], depth)
        yield queues
        jobs = GaugeMetricFamily("broker_jobs", "Media jobs by status", labels=["status"])
        for status, count in state["jobs"].items():
            jobs.add_metric([status], count)
        yield jobs


def exposition(read_live_state) -> bytes:
    """Text exposition: this process's counters (every process's with PROMETHEUS_MULTIPROC_DIR) and live gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        for metric in (REQUESTS, LATENCY, UPSTREAM_ERRORS, CREDITS_CHARGED, JOB_OUTCOMES):
            registry.register(metric)
    registry.register(LiveState(read_live_state))
    return generate_latest(registry)
