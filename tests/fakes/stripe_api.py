"""Stateful fake Stripe API plus Stripe/Coinbase Commerce webhook signing helpers (PROVIDERS.md §8, §9).

Besides the API it serves a stand-in for Stripe's hosted Checkout page (`GET /pay/{id}`, with
**Pay** and **Cancel** buttons that work without JavaScript) and the charge's receipt page.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import html
import json
import re
import secrets
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qsl
from wsgiref.types import StartResponse, WSGIEnvironment

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = [
    "API_VERSION",
    "FakeStripe",
    "StripeRequest",
    "coinbase_event",
    "coinbase_signature",
    "decode_form",
    "stripe_signature",
    "stripe_webhook",
]

API_VERSION = "2026-06-24.dahlia"  # event envelope `api_version` (PROVIDERS.md §8b)
CHECKOUT_TTL = 24 * 3600  # default Checkout Session lifetime (seconds)
_MODES = ("payment", "setup", "subscription")
_JSON = "application/json"
_ALNUM = string.ascii_letters + string.digits
_Headers = list[tuple[str, str]]
JSONDict = dict[str, Any]


@dataclass
class StripeRequest:
    """One request as the fake received it; header names are lower-case, `form` is the decoded body."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    form: JSONDict = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass
class _Saved:
    """An idempotent result: what was asked and what was answered."""

    method: str
    path: str
    params: JSONDict
    status: int
    body: bytes


class _StripeError(Exception):
    """Rendered as Stripe's `{"error": {...}}` body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> JSONDict:
        error: JSONDict = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def _missing(param: str) -> _StripeError:
    return _StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def _stripe_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode()


def _status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


# --------------------------------------------------------------------------- form encoding

_BRACKETS = re.compile(r"\[([^\]]*)\]")


def decode_form(body: str | bytes) -> JSONDict:
    """Decode Stripe's form encoding (`a[b][0][c]=v`, `a[]=v`) into nested dicts and lists; leaves stay strings."""
    text = body.decode() if isinstance(body, bytes) else body
    root: JSONDict = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head, *_BRACKETS.findall("[" + rest)] if rest else [head]
        node: Any = root
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise _StripeError(400, f"Invalid value for {key}: conflicting nested parameters.", param=key)
            name = part if part != "" else str(len(node))  # `a[]` appends
            if i == len(parts) - 1:
                node[name] = value
            else:
                node = node.setdefault(name, {})
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _as_int(value: Any, param: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise _StripeError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param)


# --------------------------------------------------------------------------- the fake


class _Handler(WSGIRequestHandler):
    """werkzeug's handler without the access log."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class FakeStripe:
    """An in-process, stateful Stripe API: Checkout Sessions, a stand-in hosted page, events and refunds."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        async_crypto: bool = False,
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.url = ""  # STRIPE_API_BASE, e.g. http://127.0.0.1:PORT
        self.api_key = api_key  # when set, only this exact key is accepted (else any sk_test_…)
        self.async_crypto = async_crypto  # Pay on the hosted page of a crypto session leaves it complete + unpaid
        self.record = record
        self.sessions: dict[str, JSONDict] = {}  # live checkout.session objects by id
        self.payment_intents: dict[str, JSONDict] = {}  # payment_intent objects by id (made when a session completes)
        self.charges: dict[str, JSONDict] = {}  # charge objects by session id (made when a session is paid)
        self.receipts: dict[str, str] = {}  # receipt token (the end of a charge's receipt_url) -> session id
        self.events: list[JSONDict] = []  # every envelope built by `event()`
        self.requests: list[StripeRequest] = []
        self.idempotency: dict[str, _Saved] = {}
        self._async_crypto_default = async_crypto
        self._errors: deque[_StripeError] = deque()
        self._hooks: list[tuple[str, Callable[[], object]]] = []
        self._lock = threading.RLock()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = make_server(self.host, self.port, self.wsgi_app, threaded=True, request_handler=_Handler)
        self.port = server.socket.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-stripe-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.sessions.clear()
            self.payment_intents.clear()
            self.charges.clear()
            self.receipts.clear()
            self.events.clear()
            self.requests.clear()
            self.idempotency.clear()
            self._errors.clear()
            self._hooks.clear()
            self.async_crypto = self._async_crypto_default

    # ------------------------------------------------------------------ control methods for tests

    def queue_error(
        self,
        status: int = 500,
        message: str = "An unknown error occurred",
        *,
        type: str = "api_error",
        code: str | None = None,
    ) -> None:
        """Make the next /v1 API request answer this Stripe error (not saved for idempotency)."""
        with self._lock:
            self._errors.append(_StripeError(status, message, type=type, code=code))

    def before_next(self, method: str, path_pattern: str, action: Callable[[], object]) -> None:
        """Run `action` once, just before the next /v1 request whose method and path (a regex) match.

        For races: e.g. the buyer pays in another tab while the broker asks to expire the session.
        Errors the action queues (`queue_error`) are served to that same request.
        """
        with self._lock:
            self._hooks.append((f"{method.upper()} {path_pattern}", action))

    def session(self, session_id: str) -> JSONDict:
        """A snapshot (deep copy) of the current session object."""
        with self._lock:
            return copy.deepcopy(self.sessions[session_id])

    def pay(self, session_id: str) -> JSONDict:
        """The buyer paid: status complete, payment_status paid. Returns a snapshot of the session."""
        return self._complete(session_id, "paid")

    def complete_unpaid(self, session_id: str) -> JSONDict:
        """Checkout finished with an async method still settling: status complete, payment_status unpaid."""
        return self._complete(session_id, "unpaid")

    def fail(self, session_id: str) -> JSONDict:
        """The async payment failed (pair with `checkout.session.async_payment_failed`): complete + unpaid."""
        with self._lock:
            session = self._complete(session_id, "unpaid")
            self.payment_intents[session["payment_intent"]]["status"] = "requires_payment_method"
            return session

    def expire(self, session_id: str) -> JSONDict:
        """The open session expired unpaid (pair with `checkout.session.expired`), as its `expires_at` passing does."""
        with self._lock:
            return self._expire(session_id)

    def refund(self, session_id: str, amount: int | None = None) -> tuple[JSONDict, JSONDict]:
        """Refund `amount` (default: all that remains) of a paid session's charge.

        Returns `(charge, previous_attributes)` for a `charge.refunded` event. The charge's `metadata` is the
        session's `payment_intent_data[metadata]` (as on real Stripe), not the session's own metadata.
        """
        with self._lock:
            session = self.sessions[session_id]
            if session["payment_status"] != "paid":
                raise ValueError(f"session {session_id} is not paid")
            charge = self.charges[session_id]
            previous = charge["amount_refunded"]
            remaining = charge["amount"] - previous
            amount = remaining if amount is None else amount
            if amount <= 0 or amount > remaining:
                raise ValueError(f"refund of {amount} is invalid: {remaining} remains refundable")
            charge["amount_refunded"] = previous + amount
            charge["refunded"] = charge["amount_refunded"] == charge["amount"]
            return copy.deepcopy(charge), {"amount_refunded": previous}

    def event(self, type: str, obj: JSONDict, previous_attributes: JSONDict | None = None) -> JSONDict:
        """A full event envelope around `obj` (see `stripe_webhook` to sign and serialise it)."""
        data: JSONDict = {"object": _public(obj)}
        if previous_attributes is not None:
            data["previous_attributes"] = copy.deepcopy(previous_attributes)
        envelope: JSONDict = {
            "id": _stripe_id("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        with self._lock:
            self.events.append(envelope)
        return copy.deepcopy(envelope)

    def _complete(self, session_id: str, payment_status: str) -> JSONDict:
        """The buyer confirmed: the PaymentIntent exists from now on (API versions since 2022-08-01 create it
        here, not with the session); a paid session also has its succeeded charge, with a `receipt_url`."""
        with self._lock:
            session = self.sessions[session_id]
            session.update(status="complete", payment_status=payment_status, url=None)
            if session["customer_details"] is None:
                session["customer_details"] = _customer_details(session["customer_email"] or "buyer@example.com")
            if session["mode"] == "payment":
                intent = self._payment_intent_for(session)
                intent["status"] = "processing"
                if payment_status == "paid":
                    charge = self._charge_for(session)
                    intent.update(status="succeeded", amount_received=charge["amount"], latest_charge=charge["id"])
            return _public(session)

    def _payment_intent_for(self, session: JSONDict) -> JSONDict:
        if session["payment_intent"] is None:
            intent = {
                "id": _stripe_id("pi_"),
                "object": "payment_intent",
                "amount": session["amount_total"],
                "amount_received": 0,
                "created": int(time.time()),
                "currency": session["currency"],
                "latest_charge": None,
                "livemode": False,
                "metadata": copy.deepcopy(session.get("_payment_intent_metadata") or {}),
                "payment_method_types": list(session["payment_method_types"]),
                "status": "requires_payment_method",
            }
            self.payment_intents[intent["id"]] = intent
            session["payment_intent"] = intent["id"]
        return self.payment_intents[session["payment_intent"]]

    def _charge_for(self, session: JSONDict) -> JSONDict:
        charge = self.charges.get(session["id"])
        if charge is None:
            token = _stripe_id("", 40)
            email = (session.get("customer_details") or {}).get("email")
            charge = {
                "id": _stripe_id("ch_"),
                "object": "charge",
                "amount": session["amount_total"],
                "amount_captured": session["amount_total"],
                "amount_refunded": 0,
                "captured": True,
                "created": int(time.time()),
                "currency": session["currency"],
                "livemode": False,
                "metadata": copy.deepcopy(session.get("_payment_intent_metadata") or {}),
                "paid": True,
                "payment_intent": session["payment_intent"],
                "receipt_email": email,
                "receipt_url": f"{self.url}/receipts/payment/{token}",
                "refunded": False,
                "status": "succeeded",
            }
            self.charges[session["id"]] = charge
            self.receipts[token] = session["id"]
        return charge

    def _expire(self, session_id: str) -> JSONDict:
        """`POST /v1/checkout/sessions/{id}/expire`: only an `open` session can be expired (Stripe's rule)."""
        session = self.sessions.get(session_id)
        if session is None:
            raise _StripeError(404, f"No such checkout.session: '{session_id}'", code="resource_missing", param="id")
        if session["status"] != "open":
            # Stripe answers 400 invalid_request_error; the exact message is not verified against live Stripe.
            raise _StripeError(
                400,
                f'Only Checkout Sessions with a status in ["open"] can be expired. '
                f'This Checkout Session has a status of "{session["status"]}".',
            )
        session.update(status="expired", url=None)
        return _public(session)

    def _expand(self, obj: JSONDict, paths: Any) -> JSONDict:
        """Replace ids named by `expand[]` paths (`payment_intent`, `payment_intent.latest_charge`) by their objects."""
        if paths is None:
            return obj
        if not isinstance(paths, list):
            raise _StripeError(400, "Invalid array", code="parameter_invalid_array", param="expand")
        for path in paths:
            node: Any = obj
            for name in str(path).split("."):
                if not isinstance(node, dict) or name not in _EXPANDABLE or name not in node:
                    raise _StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
                if isinstance(node[name], str):
                    node[name] = self._find(name, node[name])
                node = node[name]
                if node is None:
                    break
        return obj

    def _find(self, kind: str, object_id: str) -> JSONDict:
        if _EXPANDABLE[kind] == "payment_intent":
            return self._retrieve_payment_intent(object_id)
        return self._retrieve_charge(object_id)

    # ------------------------------------------------------------------ WSGI

    def wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO") or "/"
        query = environ.get("QUERY_STRING", "")
        headers = _headers(environ)
        raw = _read_body(environ)
        idem = headers.get("idempotency-key")
        try:
            form = decode_form(raw) if method == "POST" else decode_form(query)
        except _StripeError as exc:
            form = {}
            bad_form: _StripeError | None = exc
        else:
            bad_form = None
        if self.record:
            with self._lock:
                self.requests.append(StripeRequest(method, path, query, headers, form, idem))
        if path.startswith("/pay/"):
            return self._hosted_page(method, path[len("/pay/") :], form, start_response)
        if path.startswith("/receipts/payment/") and method == "GET":
            return self._receipt_page(path[len("/receipts/payment/") :], start_response)
        extra: _Headers = [("Request-Id", _stripe_id("req_", 14))]
        if "stripe-version" in headers:
            extra.append(("Stripe-Version", headers["stripe-version"]))
        if idem is not None and method == "POST":
            extra.append(("Idempotency-Key", idem))
        try:
            if bad_form is not None:
                raise bad_form
            self._authenticate(headers)
            with self._lock:
                hook = next((h for h in self._hooks if re.fullmatch(h[0], f"{method} {path}")), None)
                if hook is not None:
                    self._hooks.remove(hook)
                    hook[1]()
                if self._errors:
                    raise self._errors.popleft()
            if path == "/v1/checkout/sessions" and method == "POST":
                status, body, replayed = self._create_session(path, form, idem)
                if replayed:
                    extra.append(("Idempotent-Replayed", "true"))
                return _respond(start_response, status, extra, body)
            match = re.fullmatch(r"/v1/checkout/sessions/([^/]+)", path)
            if match and method == "GET":
                found = self._expand(self._retrieve(match.group(1)), form.get("expand"))
                return _respond(start_response, 200, extra, _dumps(found))
            match = re.fullmatch(r"/v1/checkout/sessions/([^/]+)/expire", path)
            if match and method == "POST":
                with self._lock:
                    expired = self._expire(match.group(1))
                return _respond(start_response, 200, extra, _dumps(expired))
            match = re.fullmatch(r"/v1/payment_intents/([^/]+)", path)
            if match and method == "GET":
                found = self._expand(self._retrieve_payment_intent(match.group(1)), form.get("expand"))
                return _respond(start_response, 200, extra, _dumps(found))
            match = re.fullmatch(r"/v1/charges/([^/]+)", path)
            if match and method == "GET":
                return _respond(start_response, 200, extra, _dumps(self._retrieve_charge(match.group(1))))
            raise _StripeError(
                404,
                f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                "or we can help at https://support.stripe.com/.",
            )
        except _StripeError as exc:
            if exc.status == 401:
                extra.append(("WWW-Authenticate", 'Bearer realm="Stripe"'))
            return _respond(start_response, exc.status, extra, _dumps(exc.body()))

    def _authenticate(self, headers: dict[str, str]) -> None:
        auth = headers.get("authorization", "")
        if not auth:
            raise _StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization header, "
                "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#"
                "authentication for details, or we can help at https://support.stripe.com/.",
            )
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        ok = scheme.lower() == "bearer" and key.startswith("sk_test_") and len(key) > len("sk_test_")
        if ok and self.api_key is not None:
            ok = hmac.compare_digest(key, self.api_key)
        if not ok:
            shown = f"{key[:8]}{'*' * 8}{key[-4:]}" if len(key) > 12 else key or auth
            raise _StripeError(401, f"Invalid API Key provided: {shown}")

    def _create_session(self, path: str, params: JSONDict, idem: str | None) -> tuple[int, bytes, bool]:
        with self._lock:
            if idem is not None:
                saved = self.idempotency.get(idem)
                if saved is not None:
                    if (saved.method, saved.path, saved.params) != ("POST", path, params):
                        raise _StripeError(
                            400,
                            "Keys for idempotent requests can only be used with the same parameters they were "
                            f"first used with. Try using a key other than '{idem}' if you meant to execute a "
                            "different request.",
                            type="idempotency_error",
                        )
                    return saved.status, saved.body, True
            session = self._build_session(params)  # validation errors are not saved (Stripe: §8e)
            self.sessions[session["id"]] = session
            body = _dumps(_public(session))
            if idem is not None:
                self.idempotency[idem] = _Saved("POST", path, copy.deepcopy(params), 200, body)
            return 200, body, False

    def _build_session(self, p: JSONDict) -> JSONDict:
        mode = p.get("mode")
        if not mode:
            raise _missing("mode")
        if mode not in _MODES:
            raise _StripeError(
                400,
                f"Invalid mode: must be one of {', '.join(_MODES)}",
                code="parameter_invalid_enum",  # not verified against live Stripe
                param="mode",
            )
        if not p.get("success_url"):
            raise _missing("success_url")
        items = p.get("line_items")
        if not items:
            raise _missing("line_items")
        if not isinstance(items, list):
            raise _StripeError(400, "Invalid array", code="parameter_invalid_array", param="line_items")
        total, currency = 0, None
        for i, item in enumerate(items):
            pre = f"line_items[{i}]"
            if not isinstance(item, dict):
                raise _StripeError(400, "Invalid object", code="parameter_invalid_object", param=pre)
            price = item.get("price_data")
            if not isinstance(price, dict):
                raise _missing(f"{pre}[price_data]")
            if not price.get("currency"):
                raise _missing(f"{pre}[price_data][currency]")
            if "unit_amount" not in price:
                raise _missing(f"{pre}[price_data][unit_amount]")
            unit = _as_int(price["unit_amount"], f"{pre}[price_data][unit_amount]")
            product = price.get("product_data")
            if not isinstance(product, dict) or not product.get("name"):
                raise _missing(f"{pre}[price_data][product_data][name]")
            if "quantity" not in item:
                raise _missing(f"{pre}[quantity]")
            qty = _as_int(item["quantity"], f"{pre}[quantity]")
            if unit < 0 or qty < 1:
                raise _StripeError(400, "This value must be greater than or equal to 1.", param=f"{pre}[quantity]")
            cur = price["currency"].lower()
            if currency is not None and cur != currency:
                raise _StripeError(400, "All line items must share one currency.", param=f"{pre}[price_data][currency]")
            currency = cur
            total += unit * qty
        metadata = p.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise _StripeError(400, "Invalid object", code="parameter_invalid_object", param="metadata")
        pmt = p.get("payment_method_types")
        if pmt is None:
            methods = ["card"]
        elif isinstance(pmt, list) and pmt and all(isinstance(m, str) and m for m in pmt):
            methods = list(dict.fromkeys(pmt))
        else:
            raise _StripeError(400, "Invalid array", code="parameter_invalid_array", param="payment_method_types")
        created = int(time.time())
        expires_at = _as_int(p["expires_at"], "expires_at") if p.get("expires_at") else created + CHECKOUT_TTL
        sid = _stripe_id("cs_test_", 58)
        email = p.get("customer_email") or None
        pi_data = p.get("payment_intent_data")
        return {
            "id": sid,
            "object": "checkout.session",
            "amount_subtotal": total,
            "amount_total": total,
            "cancel_url": p.get("cancel_url"),
            "client_reference_id": p.get("client_reference_id") or None,
            "created": created,
            "currency": currency,
            "customer": p.get("customer") or None,
            "customer_details": _customer_details(email) if email else None,
            "customer_email": email,
            "expires_at": expires_at,
            "livemode": False,
            "metadata": metadata,
            "mode": mode,
            "payment_intent": None,  # made when the buyer confirms (`_complete`)
            "payment_method_types": methods,
            "payment_status": "unpaid",
            "status": "open",
            "success_url": p["success_url"],
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": p.get("ui_mode") or "hosted_page",
            "url": f"{self.url}/pay/{sid}",
            # private (stripped by `_public`): the PaymentIntent's and charge's metadata, and what the page shows
            "_payment_intent_metadata": (pi_data or {}).get("metadata") if isinstance(pi_data, dict) else None,
            "_items": [(item["price_data"]["product_data"]["name"], _as_int(item["quantity"], "")) for item in items],
        }

    def _retrieve(self, session_id: str) -> JSONDict:
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise _StripeError(
                    404,
                    f"No such checkout.session: '{session_id}'",
                    code="resource_missing",
                    param="id",
                )
            return _public(session)

    def _retrieve_charge(self, charge_id: str) -> JSONDict:
        with self._lock:
            for charge in self.charges.values():
                if charge["id"] == charge_id:
                    return copy.deepcopy(charge)
        raise _StripeError(404, f"No such charge: '{charge_id}'", code="resource_missing", param="id")

    def _retrieve_payment_intent(self, intent_id: str) -> JSONDict:
        with self._lock:
            intent = self.payment_intents.get(intent_id)
            if intent is None:
                raise _StripeError(
                    404, f"No such payment_intent: '{intent_id}'", code="resource_missing", param="intent"
                )
            return copy.deepcopy(intent)

    def _hosted_page(self, method: str, session_id: str, form: JSONDict, start_response: StartResponse) -> list[bytes]:
        """Stand-in for checkout.stripe.com: a page with Pay and Cancel; each posts back here and 303s onwards.

        Pay completes the session (paid, or unpaid while a crypto payment settles when `async_crypto`)
        and goes to `success_url` with `{CHECKOUT_SESSION_ID}` filled in; Cancel goes to `cancel_url`
        and leaves the session open, as Stripe's back link does.
        """
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                return _html(start_response, 404, "Not found", "<h1>No such Checkout Session</h1>")
            if session["status"] == "expired":
                return _html(start_response, 410, "Expired", "<h1>This Checkout Session has expired</h1>")
            if method != "POST":
                return _html(start_response, 200, "Pay", self._checkout_body(session))
            action = form.get("action")
            if action == "cancel" and session["status"] == "open":
                target = session.get("cancel_url") or session["success_url"]
            elif action in ("pay", "cancel"):
                if session["status"] == "open":
                    crypto = "crypto" in session["payment_method_types"]
                    self._complete(session_id, "unpaid" if crypto and self.async_crypto else "paid")
                target = session["success_url"]
            else:
                return _html(start_response, 400, "Bad request", "<h1>Choose Pay or Cancel</h1>")
        location = target.replace("{CHECKOUT_SESSION_ID}", session_id)
        body = f'<a href="{html.escape(location)}">Continue</a>'.encode()
        start_response(
            _status_line(303),
            [("Location", location), ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _checkout_body(self, session: JSONDict) -> str:
        items = "".join(
            f"<li>{html.escape(name)}{f' × {qty}' if qty != 1 else ''}</li>" for name, qty in session["_items"]
        )
        total = f"{_money(session['amount_total'], session['currency'])}"
        if session["status"] != "open":
            return f"<h1>Already paid</h1><p>{total}</p>"
        return (
            f"<h1>Pay {total}</h1><ul>{items}</ul>"
            f'<form method="post" action="/pay/{html.escape(session["id"])}">'
            '<button type="submit" name="action" value="pay">Pay</button> '
            '<button type="submit" name="action" value="cancel">Cancel</button></form>'
            "<p>Test mode (a local fake of Stripe Checkout): nothing is charged.</p>"
        )

    def _receipt_page(self, token: str, start_response: StartResponse) -> list[bytes]:
        with self._lock:
            session_id = self.receipts.get(token)
            charge = self.charges.get(session_id) if session_id else None
            if charge is None:
                return _html(start_response, 404, "Not found", "<h1>No such receipt</h1>")
            paid = datetime.fromtimestamp(charge["created"], UTC).strftime("%Y-%m-%d %H:%M UTC")
            body = (
                f"<h1>Receipt</h1><p>Amount paid: {_money(charge['amount'], charge['currency'])}</p>"
                f"<p>Date paid: {paid}</p><p>Charge: {html.escape(charge['id'])}</p>"
            )
        return _html(start_response, 200, "Receipt", body)


_EXPANDABLE = {"payment_intent": "payment_intent", "latest_charge": "charge"}


def _money(cents: int, currency: str) -> str:
    return f"${cents / 100:,.2f} {currency.upper()}" if currency == "usd" else f"{cents} {currency.upper()}"


def _html(start_response: StartResponse, status: int, title: str, content: str) -> list[bytes]:
    """A small self-contained page (no scripts, no external resources) in the fake's own origin."""
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{html.escape(title)} · Fake Stripe</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;padding:0 1rem;color:#1a1a1a}"
        "button{font:inherit;padding:.5rem 1.25rem;margin-right:.5rem}</style></head>"
        f"<body><main>{content}</main></body></html>"
    )
    body = page.encode()
    start_response(
        _status_line(status), [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _public(obj: JSONDict) -> JSONDict:
    return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}


def _customer_details(email: str) -> JSONDict:
    return {"address": None, "email": email, "name": None, "phone": None, "tax_exempt": "none", "tax_ids": []}


def _read_body(environ: WSGIEnvironment) -> bytes:
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > 0:
        return stream.read(length)
    if environ.get("wsgi.input_terminated"):
        return stream.read()
    return b""


def _headers(environ: WSGIEnvironment) -> dict[str, str]:
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def _respond(start_response: StartResponse, status: int, headers: _Headers, body: bytes) -> list[bytes]:
    start_response(_status_line(status), [*headers, ("Content-Type", _JSON), ("Content-Length", str(len(body)))])
    return [body]


# --------------------------------------------------------------------------- signatures and webhook bodies


def stripe_signature(payload: str | bytes, secret: str, t: int | None = None) -> str:
    """`Stripe-Signature` value `t=…,v1=…` over `f"{t}.{payload}"`, keyed by the whole `whsec_…` secret (§8c)."""
    t = int(time.time()) if t is None else t
    text = payload.decode() if isinstance(payload, bytes) else payload
    sig = hmac.new(secret.encode(), f"{t}.{text}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={sig}"


def stripe_webhook(event: JSONDict, secret: str, t: int | None = None) -> tuple[bytes, dict[str, str]]:
    """Serialise `event` and sign it: `(raw body, headers)` ready to POST to the broker's webhook."""
    body = json.dumps(event, indent=2).encode()
    return body, {"Content-Type": _JSON, "Stripe-Signature": stripe_signature(body, secret, t)}


_CC_TIMELINE = {
    "charge:created": ["NEW"],
    "charge:pending": ["NEW", "PENDING"],
    "charge:confirmed": ["NEW", "PENDING", "COMPLETED"],
    "charge:failed": ["NEW", "FAILED"],
    "charge:delayed": ["NEW", "PENDING"],
    "charge:resolved": ["NEW", "PENDING", "COMPLETED"],
}


def _usdc(amount_usd: str) -> str:
    text = f"{Decimal(amount_usd):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def coinbase_event(type: str, code: str, metadata: dict[str, Any], amount_usd: str = "10.00") -> JSONDict:
    """A legacy Coinbase Commerce webhook body (§9) for charge `code`; sign its raw bytes with `coinbase_signature`."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    charge_id = str(uuid.uuid4())
    return {
        "id": str(uuid.uuid4()),
        "scheduled_for": now,
        "attempt_number": 1,
        "event": {
            "id": str(uuid.uuid4()),
            "resource": "event",
            "type": type,
            "api_version": "2018-03-22",
            "created_at": now,
            "data": {
                "id": charge_id,
                "code": code,
                "pricing_type": "fixed_price",
                "pricing": {
                    "local": {"amount": amount_usd, "currency": "USD"},
                    "settlement": {"amount": _usdc(amount_usd), "currency": "USDC"},
                },
                "metadata": dict(metadata),
                "timeline": [{"status": s, "time": now} for s in _CC_TIMELINE.get(type, ["NEW"])],
                "hosted_url": f"https://commerce.coinbase.com/pay/{charge_id}",
            },
        },
    }


def coinbase_signature(body: bytes, secret: str) -> str:
    """`X-CC-Webhook-Signature`: hex HMAC-SHA256 of the raw body keyed by the shared secret (§9)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Stripe API until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--async-crypto", action="store_true", help="crypto sessions settle asynchronously")
    args = parser.parse_args(argv)
    fake = FakeStripe(host=args.host, port=args.port, async_crypto=args.async_crypto, record=False).start()
    print(f"fake stripe listening on {fake.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
