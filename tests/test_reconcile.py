"""``reconcile`` catches what the money audit (issue 10) found it blind to.

Beyond invariant L (Redis against SQL) it reports: an entry that waited in Redis longer than
30 s, a hold that belongs to no live request or job, a job whose stated cost is not what the
ledger charged (or a live job without a hold), and a purchase whose refunded credits are not
what the ledger booked for it. Each case is made here the way the fault made it.
"""

from __future__ import annotations

import time

from sqlalchemy import select, update

from broker.ledger import HOLD_GRACE, STREAM_MAX_AGE
from broker.models import Job, Purchase
from tests.conftest import STRIPE_WEBHOOK_SECRET, make_tenant
from tests.fakes.stripe_api import stripe_webhook


def mismatches(app, now: float | None = None) -> list[str]:
    svc = app.extensions["broker"]
    return [str(m) for m in svc.ledger.reconcile(svc.db(), now=now)]


def test_a_clean_ledger_reports_nothing(app, tenant):
    ledger = app.extensions["broker"].ledger
    assert ledger.hold(tenant.account_id, "req_live", 1000, 0, 1, 1).ok  # a request in flight
    assert mismatches(app) == []


def test_an_entry_left_in_redis_too_long_is_reported(app, tenant):
    ledger = app.extensions["broker"].ledger
    ledger.hold(tenant.account_id, "req_a", 1000, 0, 1, 1)  # its entry waits for the drain
    found = mismatches(app, now=time.time() + STREAM_MAX_AGE + 5)
    assert any(f"account {tenant.account_id}: entries waited" in m for m in found), found
    assert mismatches(app) == []  # drained by the first reconcile


def test_a_hold_past_its_deadline_that_no_request_or_job_owns_is_reported(app, tenant):
    """Issue 10 items 3 and 5: a stream's hold expired unseen, a hold that landed after its request gave up."""
    ledger = app.extensions["broker"].ledger
    ledger.hold(tenant.account_id, "req_orphan", 5000, 0, 1, 1, ttl=1)
    assert mismatches(app) == []  # still within its deadline
    found = mismatches(app, now=time.time() + 1 + HOLD_GRACE + 5)
    assert found == [f"account {tenant.account_id}: hold req_orphan (5000 µcr) belongs to no live request or job"]


def test_a_job_whose_hold_outlived_it_or_whose_cost_differs_is_reported(app, client, tenant, upstream):
    answer = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": "hello", "voice_id": "JBFqnCBsd6RMkjVDRZzb"},
        headers=tenant.headers,
    )
    assert answer.status_code == 202, answer.json
    job_id = answer.json["id"]
    assert mismatches(app) == []  # queued, holding
    db = app.extensions["broker"].db()
    db.execute(update(Job).where(Job.id == job_id).values(status="failed"))  # ended without its hold ending
    db.commit()
    assert mismatches(app) == [
        f"account {tenant.account_id}: hold {db.get(Job, job_id).hold_id} "
        f"({db.get(Job, job_id).hold_ucr} µcr) is open for job {job_id}, failed"
    ]
    job = db.get(Job, job_id)
    app.extensions["broker"].ledger.end_hold(tenant.account_id, job.hold_id, 700, {"request_id": job.hold_id})
    db.execute(update(Job).where(Job.id == job_id).values(status="succeeded", cost_ucr=600))
    db.commit()
    assert mismatches(app) == [
        f"account {tenant.account_id}: job {job_id} (succeeded) states 600 µcr, the ledger charged 700"
    ]


def test_a_purchase_whose_refund_the_ledger_did_not_book_is_reported(app, client, stripe_fake):
    """Issue 10 items 1 and 2: refunds booked as "already spent", or the purchase row disagreeing with the debits."""
    tenant = make_tenant("0")
    created = client.post("/v1/checkout", json={"pack": "usd5"}, headers=tenant.headers).json
    paid = stripe_fake.event("checkout.session.completed", stripe_fake.pay(created["id"]))
    refund = stripe_fake.event("charge.refunded", *stripe_fake.refund(created["id"], 200))
    for event in (paid, refund):
        body = stripe_webhook(event, STRIPE_WEBHOOK_SECRET)
        assert client.post("/webhooks/stripe", data=body[0], headers=body[1]).status_code == 200
    assert mismatches(app) == []
    db = app.extensions["broker"].db()
    purchase = db.scalar(select(Purchase).where(Purchase.account_id == tenant.account_id))
    db.execute(update(Purchase).where(Purchase.id == purchase.id).values(refunded_ucr=0, shortfall_ucr=200_000_000))
    db.commit()
    found = mismatches(app)
    assert (
        f"account {tenant.account_id}: purchase {purchase.id} says 0 µcr refunded, the ledger took 200000000" in found
    )
