"""Helpers for adapters that translate OpenAI's chat vocabulary to another provider's.

Reading OpenAI shapes (``file`` content parts, tool-call arguments, ``response_format``)
and bounding what a provider bills for media it renders itself (PDF pages).
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from broker.errors import InvalidRequest
from broker.providers import _common as c

# A page object of a PDF (``/Type /Page``, never ``/Pages``), and a page tree's count.
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
# (An outline's /Count can only raise the number, which keeps it an upper bound.)
_PDF_COUNT = re.compile(rb"/Count\s+(\d+)")


def unsupported(name: str, message: str) -> InvalidRequest:
    """A 400 ``unsupported_parameter`` naming the field."""
    return InvalidRequest(message, param=name, code="unsupported_parameter")


def file_part(part: dict) -> tuple[str, str, str | None]:
    """(media type, base64 data, filename) of an OpenAI ``file`` content part sent inline.

    OpenAI's ``file_data`` is a data URL (``data:application/pdf;base64,…``); bare base64 is
    taken as a PDF when the filename says so. A ``file_id`` names a file stored at OpenAI,
    which no other provider can read: refused.
    """
    file = c.as_dict(part.get("file"))
    name = file.get("filename") if isinstance(file.get("filename"), str) else None
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise unsupported("messages", "file parts must carry file_data (a data URL); file_id is not supported here.")
    inline = c.split_data_url(data)
    if inline:
        return inline[0], inline[1], name
    if name and name.lower().endswith(".pdf"):
        return "application/pdf", data, name
    raise InvalidRequest("file_data must be a data URL such as data:application/pdf;base64,…", param="messages")


def decode_base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64.", param="messages") from None


def pdf_pages(pdf: bytes) -> int:
    """The pages of a PDF read from its page objects (or its page tree's count), or 0 when
    neither is readable (compressed object streams): such a PDF cannot be bounded.

    The larger of the two, so that stray or hidden objects never lower the count.
    """
    pages = len(_PDF_PAGE.findall(pdf))
    counts = [int(n) for n in _PDF_COUNT.findall(pdf)]
    return max([pages, *counts])


def tool_arguments(call: dict) -> dict:
    """The arguments of an OpenAI tool call (a JSON string) as the object they encode."""
    raw = c.as_dict(call.get("function")).get("arguments")
    if raw in (None, ""):
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise InvalidRequest("tool_calls[].function.arguments must be a JSON object.", param="messages") from None
    if not isinstance(value, dict):
        raise InvalidRequest("tool_calls[].function.arguments must be a JSON object.", param="messages")
    return value


def json_format(response_format: object) -> tuple[str, dict] | None:
    """(name, JSON schema) asked by ``response_format`` (``json_object``: any object), or None for text."""
    fmt = c.as_dict(response_format)
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "json_object", {"type": "object"}
    if kind == "json_schema":
        spec = c.as_dict(fmt.get("json_schema"))
        name, schema = spec.get("name"), spec.get("schema")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise InvalidRequest(
                "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'.",
                param="response_format",
            )
        schema = schema if isinstance(schema, dict) else {"type": "object"}
        if schema.get("type") != "object":
            raise unsupported("response_format", "response_format.json_schema.schema must be of type object here.")
        return name, schema
    raise InvalidRequest(f"response_format type {kind!r} is not supported.", param="response_format")
