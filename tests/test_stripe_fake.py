"""The fake Stripe API works with the official stripe-python client (PROVIDERS.md §8, §9)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import stripe

from tests.fakes.stripe_api import (
    FakeStripe,
    coinbase_event,
    coinbase_signature,
    decode_form,
    stripe_signature,
    stripe_webhook,
)

PARAMS: dict[str, Any] = {
    "mode": "payment",
    "line_items": [
        {
            "price_data": {"currency": "usd", "unit_amount": 1000, "product_data": {"name": "1000 credits"}},
            "quantity": 2,
        }
    ],
    "client_reference_id": "user_42",
    "metadata": {"user_id": "42", "purchase_id": "p_9f1c"},
    "success_url": "https://broker.example/billing/success?session_id={CHECKOUT_SESSION_ID}",
    "cancel_url": "https://broker.example/billing/cancel",
}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeStripe) -> FakeStripe:
    server.reset()
    return server


def client(fake: FakeStripe, key: str = "sk_test_x") -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": fake.url}, max_network_retries=0)


def test_decode_form_nested() -> None:
    body = "line_items[0][price_data][product_data][name]=A&line_items[0][quantity]=1&t[]=card&t[]=crypto&m[k]="
    assert decode_form(body) == {
        "line_items": [{"price_data": {"product_data": {"name": "A"}}, "quantity": "1"}],
        "t": ["card", "crypto"],
        "m": {"k": ""},
    }


def test_create_retrieve_pay(fake: FakeStripe) -> None:
    c = client(fake)
    session = c.v1.checkout.sessions.create(params=PARAMS)
    assert session.id.startswith("cs_test_") and session.object == "checkout.session"
    assert (session.status, session.payment_status, session.amount_total, session.currency) == (
        "open",
        "unpaid",
        2000,
        "usd",
    )
    assert session.url == f"{fake.url}/pay/{session.id}"
    assert session.metadata.to_dict() == PARAMS["metadata"]
    # Since API version 2022-08-01 the PaymentIntent is made when the buyer confirms, not with the session.
    assert session.client_reference_id == "user_42" and session.payment_intent is None
    assert session.payment_method_types == ["card"] and session.livemode is False
    form = fake.requests[-1].form
    assert form["line_items"][0]["price_data"]["unit_amount"] == "1000"
    assert fake.requests[-1].idempotency_key  # the SDK adds one to every POST

    assert c.v1.checkout.sessions.retrieve(session.id).status == "open"
    paid = fake.pay(session.id)
    assert (paid["status"], paid["payment_status"]) == ("complete", "paid")
    again = c.v1.checkout.sessions.retrieve(session.id)
    assert (again.status, again.payment_status) == ("complete", "paid")
    assert again.payment_intent.startswith("pi_") and again.url is None


def test_errors(fake: FakeStripe) -> None:
    with pytest.raises(stripe.AuthenticationError):
        client(fake, "sk_live_nope").v1.checkout.sessions.create(params=PARAMS)
    bad = {**PARAMS, "line_items": [{"price_data": {"currency": "usd", "product_data": {"name": "x"}}, "quantity": 1}]}
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client(fake).v1.checkout.sessions.create(params=bad)
    assert exc.value.code == "parameter_missing" and exc.value.param == "line_items[0][price_data][unit_amount]"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client(fake).v1.checkout.sessions.retrieve("cs_test_missing")
    assert exc.value.http_status == 404 and exc.value.code == "resource_missing" and exc.value.param == "id"


def test_idempotency(fake: FakeStripe) -> None:
    c = client(fake)
    first = c.v1.checkout.sessions.create(params=PARAMS, options={"idempotency_key": "k1"})
    second = c.v1.checkout.sessions.create(params=PARAMS, options={"idempotency_key": "k1"})
    assert first.id == second.id and len(fake.sessions) == 1
    with pytest.raises(stripe.IdempotencyError):
        c.v1.checkout.sessions.create(
            params={**PARAMS, "client_reference_id": "other"}, options={"idempotency_key": "k1"}
        )


def test_hosted_page_pay_redirects_to_success_and_crypto_settles_later(fake: FakeStripe) -> None:
    session = client(fake).v1.checkout.sessions.create(params=PARAMS)
    page = requests.get(session.url, timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "$20.00 USD" in page.text and "1000 credits × 2" in page.text
    assert 'value="pay">Pay</button>' in page.text and 'value="cancel">Cancel</button>' in page.text
    assert fake.sessions[session.id]["status"] == "open"  # looking is not paying
    r = requests.post(session.url, data={"action": "pay"}, allow_redirects=False, timeout=5)
    assert r.status_code == 303
    assert r.headers["Location"] == f"https://broker.example/billing/success?session_id={session.id}"
    assert fake.sessions[session.id]["payment_status"] == "paid"

    fake.async_crypto = True
    crypto = client(fake).v1.checkout.sessions.create(params={**PARAMS, "payment_method_types": ["card", "crypto"]})
    assert crypto.payment_method_types == ["card", "crypto"]
    assert requests.post(crypto.url, data={"action": "pay"}, allow_redirects=False, timeout=5).status_code == 303
    assert (fake.sessions[crypto.id]["status"], fake.sessions[crypto.id]["payment_status"]) == ("complete", "unpaid")
    assert fake.payment_intents[fake.sessions[crypto.id]["payment_intent"]]["status"] == "processing"


def test_hosted_page_cancel_goes_to_cancel_url_and_leaves_the_session_open(fake: FakeStripe) -> None:
    session = client(fake).v1.checkout.sessions.create(params=PARAMS)
    r = requests.post(session.url, data={"action": "cancel"}, allow_redirects=False, timeout=5)
    assert (r.status_code, r.headers["Location"]) == (303, PARAMS["cancel_url"])
    assert (fake.sessions[session.id]["status"], fake.sessions[session.id]["payment_intent"]) == ("open", None)
    assert requests.post(session.url, data={"action": "steal"}, timeout=5).status_code == 400
    assert requests.get(f"{fake.url}/pay/cs_test_nope", timeout=5).status_code == 404


def test_paid_session_expands_to_its_payment_intent_and_charge_with_a_receipt(fake: FakeStripe) -> None:
    c = client(fake)
    session = c.v1.checkout.sessions.create(params=PARAMS)
    requests.post(session.url, data={"action": "pay"}, allow_redirects=False, timeout=5)
    paid = c.v1.checkout.sessions.retrieve(session.id, params={"expand": ["payment_intent.latest_charge"]})
    intent = paid.payment_intent
    assert (intent.object, intent.status, intent.amount_received) == ("payment_intent", "succeeded", 2000)
    charge = intent.latest_charge
    assert (charge.object, charge.paid, charge.amount, charge.payment_intent) == ("charge", True, 2000, intent.id)
    assert charge.receipt_url.startswith(f"{fake.url}/receipts/payment/")
    receipt = requests.get(charge.receipt_url, timeout=5)
    assert receipt.status_code == 200 and "$20.00 USD" in receipt.text
    # The same through the PaymentIntent, and unexpanded ids where nothing is asked.
    assert c.v1.payment_intents.retrieve(intent.id, params={"expand": ["latest_charge"]}).latest_charge.id == charge.id
    assert c.v1.checkout.sessions.retrieve(session.id).payment_intent == intent.id
    with pytest.raises(stripe.InvalidRequestError) as exc:
        c.v1.checkout.sessions.retrieve(session.id, params={"expand": ["customer_details.nope"]})
    assert exc.value.http_status == 400 and exc.value.param == "expand"


def test_expire_only_an_open_session(fake: FakeStripe) -> None:
    c = client(fake)
    session = c.v1.checkout.sessions.create(params=PARAMS)
    expired = c.v1.checkout.sessions.expire(session.id)
    assert (expired.id, expired.status, expired.payment_status, expired.url) == (session.id, "expired", "unpaid", None)
    assert requests.get(session.url, timeout=5).status_code == 410
    assert requests.post(session.url, data={"action": "pay"}, timeout=5).status_code == 410
    with pytest.raises(stripe.InvalidRequestError) as exc:
        c.v1.checkout.sessions.expire(session.id)  # expired already
    assert exc.value.http_status == 400 and exc.value.error.type == "invalid_request_error"

    paid = c.v1.checkout.sessions.create(params=PARAMS)
    fake.pay(paid.id)
    with pytest.raises(stripe.InvalidRequestError) as exc:
        c.v1.checkout.sessions.expire(paid.id)  # a complete session cannot be expired
    assert exc.value.http_status == 400 and '"complete"' in exc.value.user_message
    assert fake.sessions[paid.id]["status"] == "complete"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        c.v1.checkout.sessions.expire("cs_test_missing")
    assert exc.value.http_status == 404 and exc.value.code == "resource_missing"


def test_signed_events_and_refunds(fake: FakeStripe) -> None:
    session = client(fake).v1.checkout.sessions.create(params=PARAMS)
    event = fake.event("checkout.session.completed", fake.pay(session.id))
    body, headers = stripe_webhook(event, "whsec_test")
    parsed = stripe.Webhook.construct_event(body, headers["Stripe-Signature"], "whsec_test", tolerance=300)
    assert parsed.type == "checkout.session.completed" and parsed.data.object.id == session.id
    payload = json.dumps(event)
    header = stripe_signature(payload, "whsec_test")
    assert stripe.Webhook.construct_event(payload, header, "whsec_test", tolerance=300).id == event["id"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload.replace("paid", "PAID"), header, "whsec_test", tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        old = stripe_signature(payload, "whsec_test", t=int(time.time()) - 1000)
        stripe.Webhook.construct_event(payload, old, "whsec_test", tolerance=300)

    charge, prev = fake.refund(session.id, 500)
    assert (charge["amount_refunded"], charge["refunded"], prev) == (500, False, {"amount_refunded": 0})
    assert charge["payment_intent"] == event["data"]["object"]["payment_intent"]
    charge, prev = fake.refund(session.id)
    assert (charge["amount_refunded"], charge["refunded"], prev) == (2000, True, {"amount_refunded": 500})
    refunded = fake.event("charge.refunded", charge, prev)
    assert refunded["data"]["previous_attributes"] == {"amount_refunded": 500}


def test_coinbase_helpers() -> None:
    body = json.dumps(coinbase_event("charge:confirmed", "XA6G6ZFR", {"purchase_id": "p_1"}, "1.00")).encode()
    event = json.loads(body)["event"]
    assert event["data"]["pricing"]["settlement"] == {"amount": "1", "currency": "USDC"}
    assert [t["status"] for t in event["data"]["timeline"]][-1] == "COMPLETED"
    assert coinbase_signature(body, "s") == hmac.new(b"s", body, hashlib.sha256).hexdigest()
