"""Server-rendered SVG bar charts for the dashboard: geometry only, the template draws it.

The SVG has no ``viewBox``: it is as wide as its box (``width="100%"``), the bars are placed
in percentages of that width and everything vertical in pixels. So the text is never scaled
down with the chart: it stays ``FONT_PX`` CSS pixels on a phone as on a desktop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#dc2626", "#0891b2", "#4b5563", "#db2777")
HEIGHT, BOTTOM, TOP = 220, 26, 22  # pixels: whole chart, x-label band below, y-label band above
FONT_PX = 12  # never below 11 px: the text is not scaled with the chart
MAX_X_LABELS = 6  # "01 Dec" at 12 px is about 40 px wide: six fit on a 320 px phone


@dataclass
class Bar:
    x: float  # percent of the chart's width
    y: float  # pixels
    width: float  # percent
    height: float  # pixels
    colour: str
    label: str


@dataclass
class Chart:
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # gridline y in pixels, label ("" for none)
    x_labels: list[tuple[float, str, str]]  # x in percent, label, text-anchor
    legend: list[tuple[str, str]]  # colour, name
    height: int = HEIGHT
    font_px: int = FONT_PX
    bottom_y: int = HEIGHT - BOTTOM


def _short(value: float) -> str:
    return f"{value:.3g}"


def stacked(dates: list, series: dict[str, list[float]], unit: str, fmt: Callable[[float], str] = _short) -> Chart:
    """Stacked bars, one per date, one colour per series; the top gridline is labelled with the scale."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(dates))]
    top = max(totals + [0]) or 1
    plot_height = HEIGHT - BOTTOM - TOP
    slot = 100 / max(len(dates), 1)
    bars, legend = [], []
    below = [0.0] * len(dates)
    for number, (name, values) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        legend.append((colour, name))
        for i, value in enumerate(values):
            if not value:
                continue
            height = value / top * plot_height
            y = HEIGHT - BOTTOM - (below[i] / top * plot_height) - height
            below[i] += value
            label = f"{dates[i]}: {name} {fmt(value)} {unit}"
            bars.append(Bar(i * slot + slot * 0.15, y, slot * 0.7, max(height, 1), colour, label))
    ticks = [(HEIGHT - BOTTOM, ""), (HEIGHT - BOTTOM - plot_height / 2, ""), (TOP, f"{fmt(top)} {unit}")]
    every = -(-len(dates) // MAX_X_LABELS)  # ceiling: at most MAX_X_LABELS labels
    x_labels = []
    for i, day in enumerate(dates):
        if i % every == 0:
            centre = i * slot + slot / 2
            # Near an edge the label starts (or ends) at its bar's edge, so it is not cut off.
            if centre < 6:
                x_labels.append((i * slot + slot * 0.15, day.strftime("%d %b"), "start"))
            elif centre > 94:
                x_labels.append((i * slot + slot * 0.85, day.strftime("%d %b"), "end"))
            else:
                x_labels.append((centre, day.strftime("%d %b"), "middle"))
    return Chart(bars, ticks, x_labels, legend)
