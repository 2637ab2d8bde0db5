"""Money in is never lost and never counted twice: Stripe Checkout, webhooks, refunds, USDC, RapidAPI, sign-up."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import func, select

from broker import billing
from broker.models import LedgerEntry, Purchase
from tests.conftest import COINBASE_WEBHOOK_SECRET, RAPIDAPI_SECRET, STRIPE_WEBHOOK_SECRET, assert_invariant
from tests.fakes.stripe_api import coinbase_event, coinbase_signature, stripe_signature, stripe_webhook
from tests.fakes.upstreams import Reply


def checkout(client, tenant, **body) -> dict:
    response = client.post("/v1/checkout", json=body or {"pack": "usd20"}, headers=tenant.headers)
    assert response.status_code == 200, response.json
    return response.json


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def send(client, event: dict, secret: str = STRIPE_WEBHOOK_SECRET, t: int | None = None):
    body, headers = stripe_webhook(event, secret, t)
    return client.post("/webhooks/stripe", data=body, headers=headers)


def grants(app, tenant) -> int:
    session = app.extensions["broker"].db()
    session.expire_all()
    return session.scalar(
        select(func.count()).where(LedgerEntry.account_id == tenant.account_id, LedgerEntry.kind == "grant")
    )


def test_checkout_session_is_created_with_pack_metadata_and_return_urls(client, tenant, stripe_fake):
    session = checkout(client, tenant)
    created = stripe_fake.sessions[session["id"]]
    assert session["url"] == created["url"]
    assert created["mode"] == "payment" and created["amount_total"] == 2000
    assert created["client_reference_id"] == str(tenant.account_id)
    ref = created["metadata"].pop("checkout_ref")
    assert created["metadata"] == {"account_id": str(tenant.account_id), "credits_ucr": "2000000000", "pack": "usd20"}
    assert "{CHECKOUT_SESSION_ID}" in created["success_url"]
    # The cancel link names the checkout by a random ref of its own (Stripe fills in the id only on success).
    assert len(ref) >= 20 and created["cancel_url"].endswith(f"/dashboard/billing/return?canceled={ref}")
    purchases = client.get("/v1/purchases", headers=tenant.headers).json["data"]
    assert [(p["status"], p["credits"], p["amount_usd"]) for p in purchases] == [("pending", "2000.000000", "20")]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"pack": "usd7"}, "pack"), ({"amount_usd": 1}, "amount_usd"), ({"amount_usd": 5000}, "amount_usd"), ({}, "pack")],
)
def test_bad_checkout_requests_name_the_param_and_create_nothing(client, tenant, stripe_fake, body, param):
    response = client.post("/v1/checkout", json=body, headers=tenant.headers)
    assert response.status_code == 400 and response.json["error"]["param"] == param
    assert stripe_fake.sessions == {}


def test_custom_amount_and_crypto(client, tenant, stripe_fake):
    session = checkout(client, tenant, amount_usd="12.34", crypto=True)
    created = stripe_fake.sessions[session["id"]]
    assert created["amount_total"] == 1234 and "crypto" in created["payment_method_types"]
    assert created["metadata"]["credits_ucr"] == "1234000000"


def test_five_concurrent_webhooks_and_the_success_page_grant_once(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    session = checkout(client, tenant)
    paid = stripe_fake.pay(session["id"])
    event = stripe_fake.event("checkout.session.completed", paid)
    body, headers = stripe_webhook(event, STRIPE_WEBHOOK_SECRET)
    results: list[int] = []
    barrier = threading.Barrier(6)

    def webhook() -> None:
        barrier.wait()
        results.append(app.test_client().post("/webhooks/stripe", data=body, headers=headers).status_code)

    def success_page() -> None:
        svc = app.extensions["broker"]
        from broker.billing import stripe_checkout

        with app.app_context():
            barrier.wait()
            stripe_checkout.fulfil_checkout(svc.stripe, svc.db(), svc.ledger, session["id"])
            svc.db.remove()

    threads = [threading.Thread(target=webhook) for _ in range(5)] + [threading.Thread(target=success_page)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 5
    assert balance(app, tenant) - start == 2_000_000_000
    assert grants(app, tenant) == 2  # the test's starting credits and this purchase
    db = app.extensions["broker"].db()
    assert db.scalar(select(func.count()).select_from(Purchase)) == 1
    assert db.scalar(select(Purchase.status)) == "paid"
    assert_invariant(app)


def test_unpaid_completion_then_async_success_grants_once_on_the_second(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    session = checkout(client, tenant, pack="usd5", crypto=True)
    unpaid = stripe_fake.complete_unpaid(session["id"])
    assert send(client, stripe_fake.event("checkout.session.completed", unpaid)).status_code == 200
    assert balance(app, tenant) == start
    paid = stripe_fake.pay(session["id"])
    assert send(client, stripe_fake.event("checkout.session.async_payment_succeeded", paid)).status_code == 200
    assert balance(app, tenant) - start == 500_000_000
    assert send(client, stripe_fake.event("checkout.session.completed", unpaid)).status_code == 200  # a late retry
    assert balance(app, tenant) - start == 500_000_000
    assert_invariant(app)


def test_events_in_reverse_order_grant_once(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    session = checkout(client, tenant, pack="usd5")
    unpaid = stripe_fake.complete_unpaid(session["id"])
    paid = stripe_fake.pay(session["id"])
    send(client, stripe_fake.event("checkout.session.async_payment_succeeded", paid))
    send(client, stripe_fake.event("checkout.session.completed", unpaid))
    assert balance(app, tenant) - start == 500_000_000
    assert grants(app, tenant) == 2
    assert_invariant(app)


def test_async_payment_failed_grants_nothing(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    session = checkout(client, tenant, pack="usd5")
    stripe_fake.complete_unpaid(session["id"])
    failed = stripe_fake.fail(session["id"])
    assert send(client, stripe_fake.event("checkout.session.async_payment_failed", failed)).status_code == 200
    assert balance(app, tenant) == start
    assert client.get("/v1/purchases", headers=tenant.headers).json["data"][0]["status"] == "failed"
    assert_invariant(app)


def test_duplicate_event_ids_and_unknown_types_are_acknowledged_and_ignored(app, client, tenant, stripe_fake):
    session = checkout(client, tenant, pack="usd5")
    event = stripe_fake.event("checkout.session.completed", stripe_fake.pay(session["id"]))
    assert send(client, event).json["outcome"] == "paid"
    assert send(client, event).json["outcome"] == "duplicate"
    other = send(client, stripe_fake.event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert other.status_code == 200 and other.json["outcome"] == "ignored"


def _bad_signature_requests(event: dict) -> list[tuple[bytes, dict]]:
    body, headers = stripe_webhook(event, STRIPE_WEBHOOK_SECRET)
    tampered = body.replace(b'"paid"', b'"paid" ')
    reserialised = json.dumps(json.loads(body), indent=1).encode()
    old = int(time.time()) - 301
    return [
        (tampered, headers),
        (body, {**headers, "Stripe-Signature": stripe_signature(body, "whsec_wrong")}),
        (body, {**headers, "Stripe-Signature": stripe_signature(body, STRIPE_WEBHOOK_SECRET, old)}),
        (reserialised, headers),
        (body, {"Content-Type": "application/json"}),
    ]


@pytest.mark.parametrize("case", ["tampered", "wrong secret", "too old", "re-serialised", "no header"])
def test_bad_stripe_signatures_are_400_and_change_nothing(app, client, tenant, stripe_fake, case):
    start = balance(app, tenant)
    session = checkout(client, tenant, pack="usd5")
    event = stripe_fake.event("checkout.session.completed", stripe_fake.pay(session["id"]))
    cases = dict(
        zip(
            ["tampered", "wrong secret", "too old", "re-serialised", "no header"],
            _bad_signature_requests(event),
            strict=True,
        )
    )
    body, headers = cases[case]
    response = client.post("/webhooks/stripe", data=body, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "bad_signature"
    assert balance(app, tenant) == start
    assert client.get("/v1/purchases", headers=tenant.headers).json["data"][0]["status"] == "pending"
    assert_invariant(app)


def _paid_purchase(app, client, tenant, stripe_fake, pack: str = "usd20") -> dict:
    session = checkout(client, tenant, pack=pack)
    send(client, stripe_fake.event("checkout.session.completed", stripe_fake.pay(session["id"])))
    return session


def test_partial_then_full_refund_takes_credits_back_once(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    session = _paid_purchase(app, client, tenant, stripe_fake)
    charge, previous = stripe_fake.refund(session["id"], 500)  # $5 of $20
    event = stripe_fake.event("charge.refunded", charge, previous)
    assert send(client, event).status_code == 200
    assert send(client, {**event, "id": event["id"] + "x"}).status_code == 200  # same refund, new delivery id
    assert balance(app, tenant) - start == 1_500_000_000
    charge, previous = stripe_fake.refund(session["id"])
    send(client, stripe_fake.event("charge.refunded", charge, previous))
    assert balance(app, tenant) == start
    purchase = client.get("/v1/purchases", headers=tenant.headers).json["data"][0]
    assert purchase["status"] == "refunded" and purchase["refunded_credits"] == "2000.000000"
    assert_invariant(app)


def test_refund_of_spent_credits_never_goes_below_zero(app, client, stripe_fake, upstream):
    from tests.conftest import make_tenant

    tenant = make_tenant("0")
    session = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    svc = app.extensions["broker"]
    svc.ledger.debit(svc.db(), tenant.account_id, 400_000_000, "spend-sim", "spent on calls")
    charge, previous = stripe_fake.refund(session["id"])
    send(client, stripe_fake.event("charge.refunded", charge, previous))
    assert balance(app, tenant) == 0
    db = app.extensions["broker"].db()
    purchase = db.scalar(select(Purchase))
    assert purchase.status == "refunded" and purchase.refunded_ucr == 100_000_000
    assert purchase.shortfall_ucr == 400_000_000
    assert_invariant(app)


def test_operator_cli_lists_and_refunds_purchases(app, client, runner, tenant, stripe_fake):
    start = balance(app, tenant)
    _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    listed = runner.invoke(args=["broker", "purchases", tenant.email])
    assert "paid" in listed.output and "500.000000 credits" in listed.output
    purchase_id = int(listed.output.split()[0])
    refunded = runner.invoke(args=["broker", "refund", str(purchase_id)])
    assert refunded.exit_code == 0 and "took back 500.000000 credits" in refunded.output
    assert balance(app, tenant) == start
    assert runner.invoke(args=["broker", "refund", str(purchase_id)]).exit_code != 0
    assert_invariant(app)


def test_success_page_fulfils_and_shows_the_purchase(app, client, tenant, stripe_fake):
    from werkzeug.security import generate_password_hash

    from broker.models import Account
    from tests.test_dashboard import login

    db = app.extensions["broker"].db()
    db.get(Account, tenant.account_id).password_hash = generate_password_hash("correct horse battery")
    db.commit()
    login(client, tenant.email)
    page = client.get("/dashboard/billing").get_data(as_text=True)
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    start = balance(app, tenant)
    redirect = client.post("/dashboard/billing/checkout", data={"pack": "usd5", "csrf_token": token})
    assert redirect.status_code == 303 and redirect.headers["Location"].startswith(stripe_fake.url + "/pay/")
    back = requests.post(redirect.headers["Location"], data={"action": "pay"}, allow_redirects=False, timeout=5)
    assert back.status_code == 303
    target = urlsplit(back.headers["Location"])
    returned = client.get(f"{target.path}?{target.query}")
    assert returned.status_code == 302
    assert balance(app, tenant) - start == 500_000_000
    billing_page = client.get("/dashboard/billing").get_data(as_text=True)
    assert 'data-testid="purchase"' in billing_page and '<td class="num">500</td>' in billing_page
    assert_invariant(app)


# -- the dashboard's checkout: the CSP, htmx, cancel returns, expiry and receipts -----------------


def logged_in(app, client, tenant) -> str:
    """Log the tenant in to the dashboard (a verified account); returns the billing page's CSRF token."""
    from werkzeug.security import generate_password_hash

    from broker.models import Account
    from tests.test_dashboard import PASSWORD, csrf_from, login

    db = app.extensions["broker"].db()
    db.get(Account, tenant.account_id).password_hash = generate_password_hash(PASSWORD)
    db.commit()
    assert login(client, tenant.email).status_code == 302
    return csrf_from(client.get("/dashboard/billing").get_data(as_text=True))


def dashboard_checkout(client, token: str, stripe_fake, **form) -> dict:
    """Buy from the billing page as a form without JavaScript does; returns the fake's new session."""
    answer = client.post("/dashboard/billing/checkout", data={"csrf_token": token, **(form or {"pack": "usd5"})})
    assert answer.status_code == 303 and answer.headers["Location"].startswith(stripe_fake.url + "/pay/")
    return stripe_fake.session(answer.headers["Location"].rpartition("/")[2])


def come_back(client, location: str):
    """Follow the hosted page's 303 back to the broker, as the buyer's browser does."""
    target = urlsplit(location)
    return client.get(f"{target.path}?{target.query}")


def purchase_of(app, session_id: str) -> Purchase:
    db = app.extensions["broker"].db()
    db.expire_all()
    return db.scalar(select(Purchase).where(Purchase.external_id == session_id))


def test_pages_allow_forms_to_post_only_to_the_site_and_the_checkout_origin(app, client, stripe_fake):
    policy = dict(
        part.strip().split(" ", 1) for part in client.get("/login").headers["Content-Security-Policy"].split(";")
    )
    assert policy["form-action"] == f"'self' {stripe_fake.url}"


@pytest.mark.parametrize(
    ("settings", "origin"),
    [
        ({"STRIPE_API_BASE": "https://api.stripe.com"}, "https://checkout.stripe.com"),
        ({"STRIPE_API_BASE": "http://127.0.0.1:12111"}, "http://127.0.0.1:12111"),
        ({"STRIPE_API_BASE": "http://localhost:12111/"}, "http://localhost:12111"),
        ({"STRIPE_API_BASE": "http://stripe-fake.internal:12111"}, "https://checkout.stripe.com"),
        ({"STRIPE_CHECKOUT_ORIGIN": "https://pay.example.com/", "STRIPE_API_BASE": "http://127.0.0.1:1"}, None),
    ],
)
def test_checkout_origin_setting_defaults_to_stripe_or_a_local_fake(settings, origin):
    import config

    loaded = config.load({"BROKER_ENV": "testing", "STRIPE_CHECKOUT_ORIGIN": "", **settings})
    assert loaded["STRIPE_CHECKOUT_ORIGIN"] == (origin or "https://pay.example.com")


@pytest.mark.parametrize("bad", ["https://checkout.stripe.com/pay", "checkout.stripe.com", "https://a b", "*"])
def test_a_checkout_origin_that_is_not_an_origin_is_refused_at_start(bad):
    import config

    with pytest.raises(RuntimeError, match="STRIPE_CHECKOUT_ORIGIN"):
        config.load({"BROKER_ENV": "testing", "STRIPE_CHECKOUT_ORIGIN": bad})


def test_htmx_buy_answers_with_hx_redirect_and_a_refusal_in_the_card(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    htmx = {"HX-Request": "true", "X-CSRFToken": token}
    answer = client.post("/dashboard/billing/checkout", data={"pack": "usd20"}, headers=htmx)
    assert answer.status_code == 204 and answer.headers["HX-Redirect"].startswith(stripe_fake.url + "/pay/")
    refused = client.post("/dashboard/billing/checkout", data={"amount_usd": "1"}, headers=htmx)
    body = refused.get_data(as_text=True)
    assert refused.status_code == 422 and body.startswith('<div id="billing"')
    assert 'data-testid="billing-error"' in body and "amount_usd must be between" in body
    assert len(stripe_fake.sessions) == 1


def test_cancel_return_expires_the_session_then_marks_the_purchase_canceled(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    start = balance(app, tenant)
    session = dashboard_checkout(client, token, stripe_fake)
    left = requests.post(session["url"], data={"action": "cancel"}, allow_redirects=False, timeout=5)
    assert left.status_code == 303 and "canceled=" in left.headers["Location"]
    back = come_back(client, left.headers["Location"])
    assert back.status_code == 302 and back.headers["Location"].endswith("/dashboard/billing")
    assert stripe_fake.session(session["id"])["status"] == "expired"
    assert [r.path for r in stripe_fake.requests if r.method == "POST"][-1].endswith(f"{session['id']}/expire")
    assert purchase_of(app, session["id"]).status == "canceled"
    assert balance(app, tenant) == start
    page = client.get("/dashboard/billing").get_data(as_text=True)
    assert "Checkout canceled; nothing was charged." in page and ">canceled</span>" in page
    # The hosted page refuses the expired session; coming back again changes nothing.
    assert requests.post(session["url"], data={"action": "pay"}, timeout=5).status_code == 410
    assert come_back(client, left.headers["Location"]).status_code == 302
    assert purchase_of(app, session["id"]).status == "canceled" and balance(app, tenant) == start
    assert_invariant(app)


def test_cancel_return_of_a_session_already_paid_fulfils_it(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    start = balance(app, tenant)
    session = dashboard_checkout(client, token, stripe_fake)
    stripe_fake.pay(session["id"])  # paid in another tab before this one's Cancel came back
    come_back(client, session["cancel_url"])
    assert not [r for r in stripe_fake.requests if r.path.endswith("/expire")]
    purchase = purchase_of(app, session["id"])
    assert purchase.status == "paid" and balance(app, tenant) - start == 500_000_000
    assert purchase.receipt_url == stripe_fake.charges[session["id"]]["receipt_url"]
    assert_invariant(app)


def test_cancel_return_racing_a_payment_fulfils_when_stripe_refuses_to_expire(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    start = balance(app, tenant)
    session = dashboard_checkout(client, token, stripe_fake)
    # The buyer's payment lands between the broker's read (open) and its expire: Stripe answers 400.
    stripe_fake.before_next("POST", r"/v1/checkout/sessions/[^/]+/expire", lambda: stripe_fake.pay(session["id"]))
    come_back(client, session["cancel_url"])
    assert stripe_fake.session(session["id"])["status"] == "complete"
    assert purchase_of(app, session["id"]).status == "paid"
    assert balance(app, tenant) - start == 500_000_000
    assert "Payment received: 500 credits added." in client.get("/dashboard/billing").get_data(as_text=True)
    assert_invariant(app)


def test_cancel_return_leaves_the_purchase_pending_when_the_expire_fails(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    session = dashboard_checkout(client, token, stripe_fake)

    def stripe_down() -> None:
        for _ in range(3):  # the first try and the client's two retries
            stripe_fake.queue_error(500)

    stripe_fake.before_next("POST", r"/v1/checkout/sessions/[^/]+/expire", stripe_down)
    assert come_back(client, session["cancel_url"]).status_code == 302
    assert stripe_fake.session(session["id"])["status"] == "open"
    assert purchase_of(app, session["id"]).status == "pending"
    assert "could not be reached" in client.get("/dashboard/billing").get_data(as_text=True)
    # Paid after all, the purchase is granted as usual.
    requests.post(session["url"], data={"action": "pay"}, allow_redirects=False, timeout=5)
    send(client, stripe_fake.event("checkout.session.completed", stripe_fake.session(session["id"])))
    assert purchase_of(app, session["id"]).status == "paid"
    assert_invariant(app)


def test_a_cancel_link_with_another_ref_touches_no_checkout(app, client, tenant, stripe_fake):
    token = logged_in(app, client, tenant)
    session = dashboard_checkout(client, token, stripe_fake)
    assert client.get("/dashboard/billing/return?canceled=not-the-ref").status_code == 302
    assert stripe_fake.session(session["id"])["status"] == "open"
    assert purchase_of(app, session["id"]).status == "pending"


def test_expired_webhook_marks_a_pending_purchase_expired_and_never_a_paid_one(app, client, tenant, stripe_fake):
    start = balance(app, tenant)
    lapsed = checkout(client, tenant, pack="usd5")
    event = stripe_fake.event("checkout.session.expired", stripe_fake.expire(lapsed["id"]))
    assert send(client, event).json == {"received": True, "outcome": "expired"}
    assert send(client, event).json["outcome"] == "duplicate"
    assert purchase_of(app, lapsed["id"]).status == "expired"
    paid = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    forged_order = {**stripe_fake.session(paid["id"]), "status": "expired", "payment_status": "unpaid"}
    send(client, stripe_fake.event("checkout.session.expired", forged_order))
    assert purchase_of(app, paid["id"]).status == "paid"
    assert balance(app, tenant) - start == 500_000_000
    statuses = {p["id"]: p["status"] for p in client.get("/v1/purchases", headers=tenant.headers).json["data"]}
    assert sorted(statuses.values()) == ["expired", "paid"]
    assert_invariant(app)


def test_fulfilment_stores_the_charge_receipt_read_through_the_payment_intent(app, client, tenant, stripe_fake):
    session = _paid_purchase(app, client, tenant, stripe_fake)
    charge = stripe_fake.charges[session["id"]]
    retrieve = [r for r in stripe_fake.requests if r.method == "GET" and r.path.endswith(session["id"])][-1]
    assert retrieve.form == {"expand": ["payment_intent.latest_charge"]}
    purchase = purchase_of(app, session["id"])
    assert purchase.receipt_url == charge["receipt_url"] and purchase.payment_intent == charge["payment_intent"]
    listed = client.get("/v1/purchases", headers=tenant.headers).json["data"][0]
    assert listed["receipt_url"] == charge["receipt_url"]
    # An async payment: no receipt while it settles, the receipt once it is paid.
    later = checkout(client, tenant, pack="usd5", crypto=True)
    send(client, stripe_fake.event("checkout.session.completed", stripe_fake.complete_unpaid(later["id"])))
    assert purchase_of(app, later["id"]).receipt_url is None
    send(client, stripe_fake.event("checkout.session.async_payment_succeeded", stripe_fake.pay(later["id"])))
    assert purchase_of(app, later["id"]).receipt_url == stripe_fake.charges[later["id"]]["receipt_url"]


def test_coinbase_confirmed_grants_once_and_bad_signatures_change_nothing(app, client, tenant):
    start = balance(app, tenant)
    metadata = {"account_id": str(tenant.account_id), "credits_ucr": "1000000000"}
    pending = json.dumps(coinbase_event("charge:pending", "XA6G6ZFR", metadata, "10.00")).encode()
    confirmed = json.dumps(coinbase_event("charge:confirmed", "XA6G6ZFR", metadata, "10.00")).encode()

    def post(body: bytes, signature: str | None):
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-CC-Webhook-Signature"] = signature
        return client.post("/webhooks/coinbase", data=body, headers=headers)

    assert post(confirmed, coinbase_signature(confirmed, "wrong")).status_code == 400
    assert post(confirmed, None).status_code == 400
    assert (
        post(confirmed.replace(b"10.00", b"99.00"), coinbase_signature(confirmed, COINBASE_WEBHOOK_SECRET)).status_code
        == 400
    )
    assert balance(app, tenant) == start
    assert post(pending, coinbase_signature(pending, COINBASE_WEBHOOK_SECRET)).json["outcome"] == "pending"
    for _ in range(2):
        assert post(confirmed, coinbase_signature(confirmed, COINBASE_WEBHOOK_SECRET)).status_code == 200
    assert balance(app, tenant) - start == 1_000_000_000
    purchases = billing.purchases_of(app.extensions["broker"].db(), tenant.account_id)
    assert [(p.provider, p.status, p.method) for p in purchases] == [("coinbase", "paid", "crypto")]
    assert_invariant(app)


RAPID = {"X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET, "X-RapidAPI-User": "alice_dev", "X-RapidAPI-Subscription": "PRO"}
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def test_rapidapi_requests_are_served_metered_and_not_charged(app, client, upstream):
    upstream.queue(Reply(input_tokens=20, output_tokens=10))
    response = client.post("/v1/chat/completions", json=CHAT, headers=RAPID)
    assert response.status_code == 200
    assert response.headers["X-Credits-Charged"] == "0.000000"
    usage = client.get("/v1/usage", headers=RAPID).json["data"]
    assert len(usage) == 1 and usage[0]["charged_ucr"] == 0
    assert usage[0]["tokens"]["input"] == 20 and usage[0]["provider_cost_usd"] != "0"
    assert usage[0]["detail"]["plan"] == "PRO"
    db = app.extensions["broker"].db()
    from broker.models import Account

    account = db.scalar(select(Account).where(Account.source == "rapidapi"))
    assert account is not None and app.extensions["broker"].ledger.balance(account.id) == 0
    assert client.post("/v1/checkout", json={"pack": "usd5"}, headers=RAPID).status_code == 403
    assert_invariant(app)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RapidAPI-User": "mallory"},
        {"X-RapidAPI-User": "mallory", "X-RapidAPI-Proxy-Secret": "guess"},
        {"X-RapidAPI-Proxy-Secret": "", "X-RapidAPI-Subscription": "MEGA"},
    ],
)
def test_rapidapi_headers_without_the_right_secret_are_401(client, upstream, headers, tenant):
    response = client.post("/v1/chat/completions", json=CHAT, headers={**headers, **tenant.headers})
    assert response.status_code == 401
    assert upstream.requests == []


def test_rapidapi_plan_limit(app, client):
    app.config["RAPIDAPI_PLANS"] = {"BASIC": 2}
    headers = {**RAPID, "X-RapidAPI-Subscription": "BASIC"}
    statuses = [client.get("/v1/balance", headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_register_is_rate_limited_per_ip(client):
    statuses = [client.post("/v1/register", json={"email": f"u{i}@example.com"}).status_code for i in range(6)]
    assert statuses == [202] * 5 + [429]


def post_coinbase(client, event: dict):
    body = json.dumps(event).encode()
    headers = {
        "Content-Type": "application/json",
        "X-CC-Webhook-Signature": coinbase_signature(body, COINBASE_WEBHOOK_SECRET),
    }
    return client.post("/webhooks/coinbase", data=body, headers=headers)


def yen_event(kind: str, code: str, metadata: dict) -> dict:
    """A charge priced in yen: pricing, settlement and payment all say what was really paid."""
    event = coinbase_event(kind, code, metadata, "1")
    charge = event["event"]["data"]
    charge["pricing"] = {
        "local": {"amount": "1", "currency": "JPY"},
        "settlement": {"amount": "0.0064", "currency": "USDC"},
    }
    return event


def test_coinbase_charge_of_one_yen_claiming_a_million_credits_grants_nothing(app, client, tenant, caplog):
    start, granted = balance(app, tenant), grants(app, tenant)
    metadata = {"account_id": str(tenant.account_id), "credits_ucr": str(1_000_000 * 1_000_000)}
    with caplog.at_level("WARNING", logger="broker.billing.coinbase"):
        response = post_coinbase(client, yen_event("charge:confirmed", "JPY00001", metadata))
    assert response.status_code == 200
    assert response.json["outcome"] == "refused: underpaid"
    assert balance(app, tenant) == start and grants(app, tenant) == granted
    refused = [r for r in caplog.records if r.getMessage() == "coinbase charge refused"]
    assert refused and refused[0].reason == "underpaid" and refused[0].paid_usd == "0.0064"
    purchases = billing.purchases_of(app.extensions["broker"].db(), tenant.account_id)
    assert [(p.status, p.currency) for p in purchases] == [("failed", "jpy")]
    # Coinbase retrying the same event changes nothing either.
    assert post_coinbase(client, yen_event("charge:confirmed", "JPY00001", metadata)).json["outcome"] == (
        "refused: underpaid"
    )
    assert balance(app, tenant) == start
    assert_invariant(app)


def test_coinbase_charge_in_an_unpriced_currency_is_refused(app, client, tenant):
    start = balance(app, tenant)
    event = coinbase_event("charge:confirmed", "EUR00001", {"account_id": str(tenant.account_id), "credits_ucr": "1"})
    event["event"]["data"]["pricing"] = {"local": {"amount": "100", "currency": "EUR"}}
    response = post_coinbase(client, event)
    assert (response.status_code, response.json["outcome"]) == (200, "refused: unpriced currency")
    assert balance(app, tenant) == start


def test_coinbase_underpaid_usd_grants_nothing_not_even_a_part(app, client, tenant):
    start, granted = balance(app, tenant), grants(app, tenant)
    # $10.00 buys 1,000 credits at $0.01; the charge asks one micro-credit more than was paid for.
    metadata = {"account_id": str(tenant.account_id), "credits_ucr": str(1_000_000_001)}
    response = post_coinbase(client, coinbase_event("charge:confirmed", "USD00001", metadata, "10.00"))
    assert (response.status_code, response.json["outcome"]) == (200, "refused: underpaid")
    assert balance(app, tenant) == start and grants(app, tenant) == granted


def test_coinbase_counts_only_confirmed_payments_in_dollars(app, client, tenant):
    """The charge's price says $10, but the payments list shows $1 confirmed and $9 merely pending."""
    start = balance(app, tenant)
    metadata = {"account_id": str(tenant.account_id), "credits_ucr": str(1_000_000_000)}
    event = coinbase_event("charge:confirmed", "PAY00001", metadata, "10.00")

    def payment(status: str, usd: str) -> dict:
        value = {"local": {"amount": usd, "currency": "USD"}, "crypto": {"amount": usd, "currency": "USDC"}}
        return {"network": "base", "transaction_id": "0x01", "status": status, "value": value}

    event["event"]["data"]["payments"] = [payment("confirmed", "1.00"), payment("pending", "9.00")]
    assert post_coinbase(client, event).json["outcome"] == "refused: underpaid"
    assert balance(app, tenant) == start
    paid = coinbase_event("charge:confirmed", "PAY00001", metadata, "10.00")
    paid["event"]["data"]["payments"] = [payment("CONFIRMED", "1.00"), payment("confirmed", "9.00")]
    assert post_coinbase(client, paid).json["outcome"] == "paid"
    assert balance(app, tenant) - start == 1_000_000_000


def test_coinbase_paid_in_full_grants_exactly_the_ordered_micro_credits_once(app, client, tenant):
    start, granted = balance(app, tenant), grants(app, tenant)
    # $12.34 at $0.01 a credit is 1,234 credits exactly; asked to the micro-credit.
    metadata = {"account_id": str(tenant.account_id), "credits_ucr": str(1_234_000_000)}
    for index in range(3):
        event = coinbase_event("charge:confirmed", "FULL0001", metadata, "12.34")
        assert post_coinbase(client, event).json["outcome"] == "paid", index
    assert balance(app, tenant) - start == 1_234_000_000
    assert grants(app, tenant) == granted + 1
    assert_invariant(app)


def test_coinbase_event_that_is_not_an_object_is_a_400(client):
    body = b"[1, 2]"
    headers = {
        "Content-Type": "application/json",
        "X-CC-Webhook-Signature": coinbase_signature(body, COINBASE_WEBHOOK_SECRET),
    }
    response = client.post("/webhooks/coinbase", data=body, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_event"


def test_concurrent_cumulative_refund_events_take_back_only_what_was_refunded(app, live_server, stripe_fake):
    """Issue 10 item 2: three cumulative charge.refunded events sent together took back their sum."""
    import threading

    import requests

    from tests.conftest import make_tenant

    client = app.test_client()
    for round_ in range(4):
        tenant = make_tenant("0")
        session = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")  # 500 credits for 500 cents
        events = [
            stripe_fake.event("charge.refunded", *stripe_fake.refund(session["id"], cents)) for cents in (150, 200, 100)
        ]
        bodies = [stripe_webhook(event, STRIPE_WEBHOOK_SECRET) for event in events]  # cumulative 150, 350, 450
        barrier, statuses = threading.Barrier(len(bodies)), []

        def deliver(body: bytes, headers: dict, barrier=barrier, statuses=statuses) -> None:
            barrier.wait()
            statuses.append(requests.post(live_server + "/webhooks/stripe", data=body, headers=headers, timeout=30))

        threads = [threading.Thread(target=deliver, args=pair) for pair in reversed(bodies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in statuses] == [200] * 3
        assert balance(app, tenant) == 50_000_000, f"round {round_}"  # 450 of 500 cents refunded
        db = app.extensions["broker"].db()
        db.expire_all()
        purchase = db.scalar(select(Purchase).where(Purchase.account_id == tenant.account_id))
        assert purchase.refunded_cents == 450 and purchase.refunded_ucr == 450_000_000
        assert purchase.status == "partially_refunded" and purchase.shortfall_ucr == 0
    assert_invariant(app)


def test_a_refund_survives_redis_losing_its_last_writes(app, client, runner, tenant, stripe_fake):
    """Issue 10 item 8: refunds went to Redis first; a Redis restored from an older state kept the credits."""
    start = balance(app, tenant)
    session = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    app.extensions["broker"].ledger.drain(app.extensions["broker"].db())  # the purchase is in SQL
    send(client, stripe_fake.event("charge.refunded", *stripe_fake.refund(session["id"])))
    app.extensions["broker"].redis.flushall()  # Redis comes back without its last writes (here: all of them)
    repaired = runner.invoke(args=["broker", "reconcile", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert balance(app, tenant) == start  # the refund's debit was durable: the credits stay taken back
    assert_invariant(app)


@pytest.mark.parametrize("request_charges", [0, 30_000_000, 480_000_000])
def test_a_refund_while_a_request_holds_credits_takes_them_as_the_hold_ends(app, client, stripe_fake, request_charges):
    """Issue 10 item 1: a refund took only the available balance and booked the rest as "already spent";
    once the hold was released the customer kept the credits of a fully refunded purchase."""
    from tests.conftest import make_tenant

    tenant = make_tenant("0")
    session = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")  # 500 credits
    ledger = app.extensions["broker"].ledger
    held = ledger.hold(tenant.account_id, "req_inflight", 480_000_000, 0, 1, 1)  # a request in flight
    assert held.ok and balance(app, tenant) == 20_000_000
    send(client, stripe_fake.event("charge.refunded", *stripe_fake.refund(session["id"])))
    assert balance(app, tenant) == 0
    assert ledger.debts(tenant.account_id) == {f"p{_purchase(app, tenant).id}": 480_000_000}
    ended = ledger.end_hold(tenant.account_id, "req_inflight", request_charges, {"request_id": "req_inflight"})
    assert ended.charged == request_charges
    ledger.drain(app.extensions["broker"].db())
    # What the request did not spend went to the refund, not back to the balance.
    assert balance(app, tenant) == 0 and ledger.debts(tenant.account_id) == {}
    purchase = _purchase(app, tenant)
    assert purchase.status == "refunded"
    assert purchase.refunded_ucr == 500_000_000 - request_charges
    assert purchase.shortfall_ucr == request_charges  # only what was actually charged
    assert_invariant(app)


def test_owed_refunds_are_paid_oldest_first_and_what_holds_cannot_cover_is_given_up(app, client, stripe_fake):
    """Two refunded purchases owe from one open hold: the first refund is paid first; what the charge
    consumed is each purchase's shortfall, and the ledger and purchases agree to the micro-credit."""
    from tests.conftest import make_tenant

    tenant = make_tenant("0")
    first = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    second = _paid_purchase(app, client, tenant, stripe_fake, pack="usd5")
    ledger = app.extensions["broker"].ledger
    assert ledger.hold(tenant.account_id, "req_big", 1_000_000_000, 0, 1, 1).ok  # all 1,000 credits held
    for session in (first, second):
        send(client, stripe_fake.event("charge.refunded", *stripe_fake.refund(session["id"])))
    ledger.end_hold(tenant.account_id, "req_big", 700_000_000, {"request_id": "req_big"})  # 300 come back
    ledger.drain(app.extensions["broker"].db())
    db = app.extensions["broker"].db()
    db.expire_all()
    older, newer = db.scalars(select(Purchase).where(Purchase.account_id == tenant.account_id).order_by(Purchase.id))
    assert (older.refunded_ucr, older.shortfall_ucr) == (300_000_000, 200_000_000)
    assert (newer.refunded_ucr, newer.shortfall_ucr) == (0, 500_000_000)
    assert balance(app, tenant) == 0 and ledger.debts(tenant.account_id) == {}
    assert_invariant(app)


def _purchase(app, tenant) -> Purchase:
    db = app.extensions["broker"].db()
    db.expire_all()
    return db.scalar(select(Purchase).where(Purchase.account_id == tenant.account_id))
