"""OpenAI request pieces → Gemini ``generateContent`` pieces, and the token bounds of media parts.

Used by ``broker.providers.gemini``. Everything here is a pure function of the request and
the model's ``rules`` (the ``rules`` object of its price-table row); any shape Gemini cannot
take raises ``InvalidRequest`` naming the field, before anything is held.

Media bounds follow Gemini's documented token rules (ai.google.dev/gemini-api/docs/tokens,
…/media-resolution, …/document-processing, …/audio), read from the rules:
- images: ``image.tokens`` per image where the model bills a fixed count (Gemini 3's default
  resolution), else 258 tokens up to 384 px on both sides and 258 per 768×768 tile beyond,
  the image first scaled to fit ``image.max_px``; an image of unknown size (a URL, or bytes
  whose header we cannot read) counts ``max_tiles`` tiles;
- PDFs: ``pdf.page_tokens`` per page for at most ``pdf.max_pages`` pages (we do not parse
  the PDF, so every PDF is held at the page cap);
- audio: 32 tokens per second; the duration is bounded from the byte size at the lowest
  byte rate the format can have (8 kbit/s MP3; a WAV's own header rate, refused below that).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator

from broker.errors import InvalidRequest
from broker.providers import _common as c

# Gemini's Schema object (an OpenAPI 3.0 subset): keys it takes; JSON Schema's others are dropped.
SCHEMA_KEYS = {
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
}
MAX_SCHEMA_DEPTH = 32
TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mp3"}
# The lowest MP3 bit rate (MPEG-2.5 layer III, 8 kbit/s): no MP3 lasts longer per byte.
MIN_AUDIO_BYTES_PER_SECOND = 1000
AUDIO_TOKENS_PER_SECOND = 32
DEFAULT_IMAGE_RULES = {"small_px": 384, "tile_px": 768, "tile_tokens": 258, "max_px": 3072, "max_tiles": 16}
DEFAULT_PDF_RULES = {"page_tokens": 258, "max_pages": 1000}


def _bad(message: str, param: str = "messages") -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _unsupported(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=name, code="unsupported_parameter")


# -- JSON Schema → Gemini Schema ---------------------------------------------------------


def schema(node: object, param: str, defs: dict | None = None, depth: int = 0) -> dict:
    """A JSON Schema as Gemini's Schema: ``$ref`` inlined, ``type`` lists and null branches
    made ``nullable``, ``const`` an enum, keys Gemini does not take dropped."""
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad("The JSON schema is nested too deeply (or recursive) for Gemini models.", param)
    if not isinstance(node, dict):
        raise _bad("Every JSON schema node must be an object.", param)
    if defs is None:
        defs = {**c.as_dict(node.get("definitions")), **c.as_dict(node.get("$defs"))}
    if "$ref" in node:
        ref = str(node["$ref"])
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith(("#/$defs/", "#/definitions/")) or name not in defs:
            raise _bad(f"The JSON schema reference {ref!r} cannot be resolved.", param)
        return schema({**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, param, defs, depth + 1)
    out: dict = {}
    nullable = False
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        nullable = len(kinds) < len(kind)
        if len(kinds) == 1:
            out["type"] = kinds[0]
        elif kinds:
            out["anyOf"] = [schema({**node, "type": k}, param, defs, depth + 1) for k in kinds]
    elif kind == "null":
        nullable = True
    elif kind is not None:
        out["type"] = kind
    branches = node.get("anyOf", node.get("oneOf"))
    if isinstance(branches, list):
        kept = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
        nullable = nullable or len(kept) < len(branches)
        converted = [schema(b, param, defs, depth + 1) for b in kept]
        if len(converted) == 1:
            out.update(converted[0])
        elif converted:
            out["anyOf"] = converted
    if "const" in node:
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key not in SCHEMA_KEYS or key in out or key in ("type", "anyOf"):
            continue
        if key == "properties":
            out[key] = {name: schema(v, param, defs, depth + 1) for name, v in c.as_dict(value).items()}
        elif key == "items":
            out[key] = schema(value, param, defs, depth + 1)
        else:
            out[key] = value
    if nullable or node.get("nullable"):
        out["nullable"] = True
    return out


# -- tools --------------------------------------------------------------------------------


def tools(extra: dict) -> list[dict] | None:
    defs = extra.get("tools")
    if not defs:
        return None
    declarations = []
    for k, tool in enumerate(map(c.as_dict, defs)):
        if tool.get("type") != "function":
            raise _unsupported("tools", f"Gemini models take function tools only, not {tool.get('type')!r}.")
        fn = c.as_dict(tool.get("function"))
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad("Every function tool needs a name.", "tools")
        declaration: dict = {"name": fn["name"]}
        if fn.get("description"):
            declaration["description"] = str(fn["description"])
        params = fn.get("parameters")
        if params and c.as_dict(params).get("properties"):
            declaration["parameters"] = schema(params, f"tools[{k}].function.parameters")
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def tool_config(extra: dict) -> dict | None:
    choice = extra.get("tool_choice")
    if extra.get("parallel_tool_calls") is False:
        raise _unsupported("parallel_tool_calls", "Gemini models cannot be kept to one tool call per turn.")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in TOOL_MODES:
            raise _bad(f"tool_choice {choice!r} is not one of auto, none, required.", "tool_choice")
        return {"functionCallingConfig": {"mode": TOOL_MODES[choice]}}
    choice = c.as_dict(choice)
    if choice.get("type") == "function":
        name = c.as_dict(choice.get("function")).get("name")
        if not isinstance(name, str):
            raise _bad("tool_choice.function.name is required.", "tool_choice")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    if choice.get("type") == "allowed_tools":
        allowed = c.as_dict(choice.get("allowed_tools"))
        if allowed.get("mode") != "required":
            raise _unsupported("tool_choice", "Gemini models restrict the callable tools only when a call is required.")
        names = [c.as_dict(t.get("function")).get("name") for t in map(c.as_dict, allowed.get("tools") or [])]
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [n for n in names if n]}}
    raise _unsupported("tool_choice", f"tool_choice of type {choice.get('type')!r} is not supported for Gemini.")


# -- messages -----------------------------------------------------------------------------


def contents(messages: list[dict]) -> tuple[list[dict], str]:
    """Gemini ``contents`` and the system text; consecutive turns of one role are merged."""
    system: list[str] = []
    turns: list[dict] = []
    for k, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            if text := c.text_of(content):
                system.append(text)
            continue
        if role == "user":
            add, parts = "user", user_parts(content)
        elif role == "assistant":
            add, parts = "model", _model_parts(message, k)
        elif role == "tool":
            add, parts = "user", [_function_response(messages, k)]
        else:
            raise _bad(f"Gemini models do not accept {role!r} messages.")
        if not parts:
            continue  # an empty turn: Gemini refuses it, and it says nothing
        if turns and turns[-1]["role"] == add:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": add, "parts": parts})
    return turns, "\n\n".join(system)


def user_parts(content: object) -> list[dict]:
    if not isinstance(content, list):
        text = c.text_of(content)
        return [{"text": text}] if text else []
    parts: list[dict] = []
    for part in map(c.as_dict, content):
        kind = part.get("type")
        if kind == "text":
            if text := str(part.get("text", "")):
                parts.append({"text": text})
        elif kind == "image_url":
            parts.append(_image_part(part))
        elif kind == "file":
            parts.append(_file_part(part))
        elif kind == "input_audio":
            parts.append(_audio_part(part))
        else:
            raise _unsupported("messages", f"Gemini models do not accept {kind!r} content parts.")
    return parts


def _image_part(part: dict) -> dict:
    url = c.image_url_of(part)
    if not url:
        raise _bad("An image_url part needs a url.")
    inline = c.split_data_url(url)
    if inline:
        if not inline[0].startswith("image/"):
            raise _bad(f"An image_url data URL must hold an image, not {inline[0]!r}.")
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    if url.startswith("https://"):
        # Gemini fetches public (or signed) HTTPS URLs itself; nothing is fetched here.
        return {"fileData": {"mimeType": _url_image_type(url), "fileUri": url}}
    raise _bad("An image URL must be https:// or a base64 data: URL.")


def _url_image_type(url: str) -> str:
    path = url.split("?", 1)[0].lower()
    for ext, mime in ((".png", "image/png"), (".webp", "image/webp"), (".gif", "image/gif"), (".heic", "image/heic")):
        if path.endswith(ext):
            return mime
    return "image/jpeg"


def _file_part(part: dict) -> dict:
    file = c.as_dict(part.get("file"))
    if file.get("file_id"):
        raise _unsupported("messages", "Uploaded file ids are not supported; send the file as file_data.")
    inline = c.split_data_url(str(file.get("file_data") or ""))
    if not inline or inline[0] != "application/pdf":
        raise _unsupported("messages", "Gemini file parts take PDF data URLs (data:application/pdf;base64,…).")
    return {"inlineData": {"mimeType": "application/pdf", "data": inline[1]}}


def _audio_part(part: dict) -> dict:
    audio = c.as_dict(part.get("input_audio"))
    mime = AUDIO_FORMATS.get(str(audio.get("format")))
    if mime is None:
        raise _bad("input_audio.format must be wav or mp3.")
    return {"inlineData": {"mimeType": mime, "data": str(audio.get("data") or "")}}


def _model_parts(message: dict, position: int) -> list[dict]:
    parts: list[dict] = []
    if text := c.text_of(message.get("content")):
        parts.append({"text": text})
    for call in map(c.as_dict, message.get("tool_calls") or []):
        fn = c.as_dict(call.get("function"))
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            args = None
        if not isinstance(args, dict):
            raise _bad(f"messages[{position}].tool_calls: arguments must be a JSON object.")
        out: dict = {"functionCall": {"name": str(fn.get("name") or ""), "args": args}}
        signature = c.as_dict(c.as_dict(call.get("extra_content")).get("google")).get("thought_signature")
        if isinstance(signature, str) and signature:
            out["thoughtSignature"] = signature
        parts.append(out)
    return parts


def _function_response(messages: list[dict], position: int) -> dict:
    """A ``tool`` message as a ``functionResponse``; its name is that of the call it answers."""
    call_id = messages[position].get("tool_call_id")
    for message in reversed(messages[:position]):
        for call in map(c.as_dict, message.get("tool_calls") or []):
            if call.get("id") == call_id:
                name = c.as_dict(call.get("function")).get("name")
                text = c.text_of(messages[position].get("content"))
                try:
                    output = json.loads(text)
                except ValueError:
                    output = text
                return {"functionResponse": {"name": name, "response": {"output": output}}}
    raise _bad(f"messages[{position}]: tool_call_id {call_id!r} answers no earlier tool call.")


# -- generation config ------------------------------------------------------------------


def response_format(extra: dict) -> dict:
    fmt = c.as_dict(extra.get("response_format"))
    kind = fmt.get("type")
    if not fmt or kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = c.as_dict(fmt.get("json_schema"))
        if not isinstance(spec.get("schema"), dict):
            raise _bad("response_format.json_schema.schema is required.", "response_format")
        return {
            "responseMimeType": "application/json",
            "responseSchema": schema(spec["schema"], "response_format.json_schema.schema"),
        }
    raise _bad(f"response_format type {kind!r} is not supported.", "response_format")


def thinking(effort: str | None, rules: dict, max_tokens: int) -> dict | None:
    """``reasoning_effort`` as ``thinkingConfig``: a budget (Gemini 2.5) or a level (Gemini 3)."""
    if effort is None:
        return None
    spec = c.as_dict(rules.get("thinking"))
    levels, budgets = c.as_dict(spec.get("levels")), c.as_dict(spec.get("budgets"))
    if effort in levels:
        return {"thinkingLevel": levels[effort]}
    if effort in budgets:
        # Thinking counts toward maxOutputTokens; a budget above it would only cut the answer.
        return {"thinkingBudget": min(int(budgets[effort]), max_tokens)}
    allowed = ", ".join(sorted({*levels, *budgets})) or "none"
    raise _unsupported("reasoning_effort", f"reasoning_effort {effort!r} is not supported here (takes: {allowed}).")


# -- media token bounds -------------------------------------------------------------------


def media_token_bound(messages: list[dict], rules: dict) -> int:
    """Prompt tokens the media parts of ``messages`` can cost at most (see the module docstring)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        for part in map(c.as_dict, content):
            kind = part.get("type")
            if kind == "image_url":
                total += image_tokens(c.image_url_of(part) or "", rules)
            elif kind == "file":
                pdf = {**DEFAULT_PDF_RULES, **c.as_dict(rules.get("pdf"))}
                total += pdf["page_tokens"] * pdf["max_pages"]
            elif kind == "input_audio":
                total += audio_tokens(c.as_dict(part.get("input_audio")))
    return total


def image_tokens(url: str, rules: dict) -> int:
    image = {**DEFAULT_IMAGE_RULES, **c.as_dict(rules.get("image"))}
    if "tokens" in image:
        return int(image["tokens"])
    size = None
    inline = c.split_data_url(url)
    if inline:
        size = image_size(_decode(inline[1], 64 * 1024))
    if size is None:
        return image["max_tiles"] * image["tile_tokens"]
    width, height = size
    if width <= image["small_px"] and height <= image["small_px"]:
        return image["tile_tokens"]
    scale = min(1.0, image["max_px"] / max(width, height))
    tiles = math.ceil(width * scale / image["tile_px"]) * math.ceil(height * scale / image["tile_px"])
    return min(tiles, image["max_tiles"]) * image["tile_tokens"]


def audio_tokens(audio: dict) -> int:
    data = str(audio.get("data") or "")
    size = len(data) * 3 // 4 + 3
    rate = MIN_AUDIO_BYTES_PER_SECOND
    if audio.get("format") == "wav":
        header = _decode(data, 64)
        if len(header) < 32 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            raise _bad("input_audio data is not a WAV file.")
        rate = struct.unpack_from("<I", header, 28)[0]  # the fmt chunk's byte rate
        if rate < MIN_AUDIO_BYTES_PER_SECOND:
            raise _bad("WAV audio below 8,000 bytes per second cannot be priced in advance; resample it.")
    return math.ceil(size / rate) * AUDIO_TOKENS_PER_SECOND + AUDIO_TOKENS_PER_SECOND


def _decode(data: str, limit: int) -> bytes:
    """The first ``limit`` bytes of base64 ``data`` (malformed data gives b"")."""
    chunk = data[: (limit // 3 + 1) * 4]
    chunk = chunk[: len(chunk) - len(chunk) % 4]
    try:
        return base64.b64decode(chunk, validate=False)[:limit]
    except (binascii.Error, ValueError):
        return b""


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, GIF, WebP or JPEG, else None."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return next(_jpeg_sizes(head), None)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if kind == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_sizes(head: bytes) -> Iterator[tuple[int, int]]:
    """The frame size from the first SOFn marker of a JPEG's header bytes."""
    pos = 2
    while pos + 9 < len(head):
        if head[pos] != 0xFF:
            return
        marker = head[pos + 1]
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", head[pos + 5 : pos + 9])
            yield w, h
            return
        pos += 2 + length
