"""The API reference page's view model, built from the OpenAPI document (no Flask here).

``reference(spec, base_url, error_meanings, models)`` walks every path and method of the
document and returns plain data for the template: parameters with types and constraints,
request-body fields with every ``$ref`` resolved into one table, a response summary,
response codes, and code examples (curl, Python ``requests`` and, for chat, the ``openai`` SDK) built
from the schemas: required fields get generated values, and a few hand-picked values
(``EXAMPLES``) make the examples runnable. Fields the document does not list never
appear in an example.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus

from markupsafe import Markup, escape

from broker import errors

PLACEHOLDER_KEY = "BROKER_API_KEY"

# Hand-picked values for request bodies, keyed by schema name. Only names the schema
# lists are used; required fields missing here get values generated from the schema.
EXAMPLES: dict[str, dict] = {
    "ChatCompletionRequest": {
        "model": "{chat}",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 200,
    },
    "SimpleChatRequest": {
        "provider": "{chat_provider}",
        "model": "{chat_model}",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 200,
    },
    "SpeechRequest": {
        "model": "{tts}",
        "text": "Hello from the broker",
        "voice_id": "{voice_id}",
        "output_format": "mp3_44100_128",
    },
    "ImageRequest": {"model": "{image}", "prompt": "a lighthouse at dawn", "size": "1024x1024", "quality": "low"},
    "MusicRequest": {"model": "{music}", "prompt": "a calm piano piece", "instrumental": True},
    "OpenAISpeechRequest": {"model": "{tts}", "input": "Hello from the broker", "voice": "alloy"},
    "OpenAIImageRequest": {"model": "{image}", "prompt": "a lighthouse at dawn", "size": "1024x1024", "quality": "low"},
    "Message": {"role": "user", "content": "Hello"},
    "EmbeddingRequest": {"model": "{embedding}", "input": "The quick brown fox jumped over the lazy dog"},
    "ResponsesRequest": {"model": "{responses}", "input": "Hello", "max_output_tokens": 200},
    "MessagesRequest": {"model": "{messages}", "max_tokens": 200, "messages": [{"role": "user", "content": "Hello"}]},
    "MessagesCountRequest": {"model": "{messages}", "messages": [{"role": "user", "content": "Hello"}]},
    "CheckoutRequest": {"pack": "usd20"},
    "RegisterRequest": {"email": "you@example.com"},
}

# Example values of path and query parameters, by name (query parameters not listed
# here and not required are left out of the examples).
PARAMETER_EXAMPLES: dict[str, object] = {
    "job_id": "job_0123456789abcdef",
    "request_id": "req_0123456789abcdef",
    "limit": 10,
    "index": 0,
}

# Notes for fields the document leaves undescribed (the document's own description wins).
FIELD_NOTES: dict[str, str] = {
    "model": "`provider/model` (e.g. `openai/gpt-4o-mini`) or a bare name that maps to one provider. "
    "See the pricing page for every model.",
    "messages": "The conversation, in OpenAI's message format.",
    "messages[].role": "Who wrote the message.",
    "messages[].content": "The text, or OpenAI's list of content parts.",
    "max_tokens": "Most tokens to generate. Without it the broker asks for at most what your balance "
    "affords; one your balance cannot cover is refused with `402` before any provider is called.",
    "max_completion_tokens": "Same as `max_tokens` (OpenAI's newer name).",
    "n": "How many choices to generate (not for Anthropic models).",
    "stream": "Answer with Server-Sent Events (see the streaming guide).",
    "stream_options": "OpenAI's stream options: `include_usage: true` adds a last chunk with the usage and "
    "`cost_credits`.",
    "temperature": "Sampling temperature.",
    "top_p": "Nucleus sampling.",
    "stop": "Up to 4 sequences where generation stops.",
    "user": "Your end user's id, passed to the provider.",
    "provider": "`openai`, `anthropic`, `gemini` or `demo`, when `model` is a bare name.",
    "text": "The text to speak.",
    "voice_id": "The provider's voice id (`demo` for `demo/tts`).",
    "output_format": "ElevenLabs' output format, e.g. `mp3_44100_128`.",
    "voice_settings": "ElevenLabs voice settings (stability, similarity_boost, style, use_speaker_boost, speed).",
    "prompt": "What to generate.",
    "size": "Image size in pixels; `auto` is held at the dearest size.",
    "quality": "Image quality; `auto` is held at the dearest quality.",
    "lyrics": "The song's lyrics (use with `style`), instead of `prompt`.",
    "style": "The musical style, with `lyrics`.",
    "instrumental": "No vocals.",
    "title": "The song's title.",
}
PARAMETER_NOTES: dict[str, str] = {
    "limit": "Page size.",
    "cursor": "`next_cursor` of the previous page.",
    "index": "Which result of the job (0 first).",
    "status": "Only jobs in this status.",
    "type": "Only jobs of this type.",
    "model": "Only requests for this model.",
}
ERROR_NOTES: dict[str, str] = {
    "error": "The error.",
    "error.type": "OpenAI-style error class, e.g. `invalid_request_error`, `authentication_error`.",
    "error.code": "Machine-readable reason, e.g. `model_not_found`, `insufficient_credits`.",
    "error.message": "What went wrong, for people.",
    "error.param": "The request field at fault, or `null`.",
}
PASS_THROUGH = (
    "tools",
    "tool_choice",
    "response_format",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "parallel_tool_calls",
    "reasoning_effort",
    "metadata",
    "prediction",
    "store",
    "verbosity",
)
for _name in PASS_THROUGH:
    FIELD_NOTES.setdefault(
        _name, "OpenAI models only: passed through as is; other providers answer `400 unsupported_parameter`."
    )

# Error codes raised by name rather than by an error class.
EXTRA_ERROR_CODES = {
    "400": ["invalid_json", "unsupported_parameter"],
    "401": ["missing_api_key", "expired_api_key"],
    "404": ["model_not_found"],
}

SDK_PATHS = {"/v1/chat/completions", "/v1/chat"}
METHOD_ORDER = {"get": 0, "post": 1, "delete": 2, "put": 3, "patch": 4}


# -- text ---------------------------------------------------------------------------


def inline(text: str | None) -> Markup:
    """``text`` escaped, on one line, with ``code`` and ``code`` spans (Markdown / reST) as ``<code>``."""
    if not text:
        return Markup("")
    html = str(escape(" ".join(text.split())))
    html = re.sub(r"``(.+?)``", r"<code>\1</code>", html)
    html = re.sub(r"`([^`]+?)`", r"<code>\1</code>", html)
    return Markup(html)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -- schemas --------------------------------------------------------------------------


def ref_name(schema: dict) -> str | None:
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else None


def resolve(schema: dict, spec: dict) -> dict:
    """The schema a ``$ref`` points at (``schema`` itself when it is not a reference)."""
    name = ref_name(schema)
    return spec["components"]["schemas"][name] if name else schema


def _variants(schema: dict) -> tuple[list[dict], bool]:
    """The non-null alternatives of a schema, and whether null is allowed."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if not options:
        return [schema], False
    others = [s for s in options if s.get("type") != "null"]
    return others, len(others) < len(options)


def type_label(schema: dict, spec: dict, show_null: bool = True) -> str:
    """A short readable type: ``string``, ``array of Message``, ``integer or null`` …

    ``show_null=False`` leaves out "or null" (for optional fields, where null means "not given").
    """
    variants, nullable = _variants(schema)
    labels = [_single_type(s, spec) for s in variants]
    label = " or ".join(dict.fromkeys(labels)) or "any"
    return f"{label} or null" if nullable and show_null else label


def _single_type(schema: dict, spec: dict) -> str:
    name = ref_name(schema)
    if name:
        return name
    if "anyOf" in schema or "oneOf" in schema:
        return type_label(schema, spec)
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_single_type(schema.get('items', {}), spec)}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"object of {type_label(extra, spec)}"
        return "object"
    if kind == "string" and schema.get("format") == "binary":
        return "binary"
    if isinstance(kind, list):
        return " or ".join(kind)
    return kind or "any"


def _code(value: object) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`" if not isinstance(value, str) else f"`{value}`"


def constraints(schema: dict) -> list[str]:
    """Readable constraints of a schema (and of its non-null alternatives): ranges, lengths, enums."""
    variants, _ = _variants(schema)
    found: list[str] = []
    sources = [schema] if variants == [schema] else [schema, *variants]
    for s in sources:
        if "enum" in s:
            found.append("one of " + ", ".join(_code(v) for v in s["enum"]))
        if "const" in s:
            found.append(f"always {_code(s['const'])}")
        low, high = s.get("minimum"), s.get("maximum")
        if low is not None and high is not None:
            found.append(f"{low} to {high}")
        elif low is not None:
            found.append(f"at least {low}")
        elif high is not None:
            found.append(f"at most {high}")
        low, high = s.get("minLength"), s.get("maxLength")
        if low is not None and high is not None:
            found.append(f"{low} to {high} characters")
        elif high is not None:
            found.append(f"at most {high} characters")
        elif low is not None:
            found.append(f"at least {low} characters")
        low, high = s.get("minItems"), s.get("maxItems")
        if low is not None and high is not None:
            found.append(f"{low} to {high} items")
        elif high is not None:
            found.append(f"at most {high} items")
        if "pattern" in s:
            found.append(f"pattern `{s['pattern']}`")
        if s.get("format") and s.get("format") != "binary":
            found.append(f"format {s['format']}")
    if schema.get("default") is not None:
        found.append(f"default {_code(schema['default'])}")
    return list(dict.fromkeys(found))


@dataclass
class FieldRow:
    name: str
    type: str
    required: bool
    constraints: list[Markup]
    description: Markup
    depth: int = 0

    @property
    def breakable_name(self) -> Markup:
        """The dotted name with line-break opportunities after each dot."""
        return Markup("<wbr>.").join(escape(part) for part in self.name.split("."))


def _nested_object(schema: dict, spec: dict) -> tuple[str, dict] | None:
    """(suffix, object schema) when a property holds a referenced object (or an array of them)."""
    variants, _ = _variants(schema)
    for option in variants:
        if option.get("type") == "array" and ref_name(option.get("items", {})):
            target = resolve(option["items"], spec)
            if target.get("properties"):
                return "[]", target
        if ref_name(option):
            target = resolve(option, spec)
            if target.get("properties"):
                return "", target
    return None


def field_rows(
    schema: dict, spec: dict, notes: dict[str, str] | None = None, prefix: str = "", depth: int = 0, max_depth: int = 2
) -> list[FieldRow]:
    """One row per property, required first, nested referenced objects expanded as ``a.b`` / ``a[].b``.

    A property's own description wins; ``notes`` (by dotted name, then by bare name) fill the gaps.
    """
    notes = notes or {}
    target = resolve(schema, spec)
    properties = target.get("properties", {})
    required = set(target.get("required", []))
    order = [n for n in target.get("required", []) if n in properties]
    order += [n for n in properties if n not in required]
    rows = []
    for name in order:
        prop = properties[name]
        full = f"{prefix}{name}"
        note = prop.get("description") or notes.get(full) or notes.get(name, "")
        limits = [inline(c) for c in constraints(prop)]
        kind = type_label(prop, spec, show_null=name in required)
        rows.append(FieldRow(full, kind, name in required, limits, inline(note), depth))
        nested = _nested_object(prop, spec)
        if nested and depth < max_depth:
            suffix, child = nested
            rows += field_rows(child, spec, notes, f"{full}{suffix}.", depth + 1, max_depth)
    return rows


# -- examples -------------------------------------------------------------------------


def example_value(schema: dict, spec: dict, name: str = "", picked: dict | None = None, seen: tuple = ()) -> object:
    """A sensible value for a schema: hand-picked where given, else built from the schema."""
    schema_name = ref_name(schema)
    target = resolve(schema, spec)
    if schema_name and schema_name in seen:
        return {}
    if schema_name:
        seen = (*seen, schema_name)
        picked = EXAMPLES.get(schema_name, picked)
    if "anyOf" in target or "oneOf" in target:
        variants, _ = _variants(target)
        return example_value(variants[0], spec, name, picked, seen) if variants else None
    if "const" in target:
        return target["const"]
    if "enum" in target:
        return target["enum"][0]
    kind = target.get("type")
    if kind == "object" or "properties" in target:
        return _example_object(target, spec, picked or {}, seen)
    if kind == "array":
        return [example_value(target.get("items", {}), spec, name, None, seen)]
    if target.get("default") is not None:
        return target["default"]
    if kind == "integer":
        return max(1, target.get("minimum", 1))
    if kind == "number":
        return target.get("minimum", 1)
    if kind == "boolean":
        return False
    if kind == "string":
        if target.get("format") == "date-time":
            return "2026-01-01T00:00:00Z"
        return name or "string"
    return None


def _example_object(schema: dict, spec: dict, picked: dict, seen: tuple) -> dict:
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    names = [n for n in picked if n in properties] + [n for n in required if n in properties and n not in picked]
    result = {}
    for name in names:
        if name in picked:
            result[name] = picked[name]
        else:
            result[name] = example_value(properties[name], spec, name, None, seen)
    return result


def fill(value: object, models: dict[str, str]) -> object:
    """Replace ``{placeholders}`` in example strings with the chosen models."""
    if isinstance(value, str):
        return value.format(**models) if "{" in value else value
    if isinstance(value, list):
        return [fill(v, models) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, models) for k, v in value.items()}
    return value


def py_literal(value: object, indent: int = 0) -> str:
    """A value as Python source, indented like black would for short structures."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f'{pad}    "{k}": {py_literal(v, indent + 4)},' for k, v in value.items()]
        one_line = "{" + ", ".join(f'"{k}": {py_literal(v)}' for k, v in value.items()) + "}"
        if len(one_line) + indent < 70 and "\n" not in one_line:
            return one_line
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        inner = [py_literal(v, indent + 4) for v in value]
        one_line = "[" + ", ".join(inner) + "]"
        if len(one_line) + indent < 70 and "\n" not in one_line:
            return one_line
        return "[\n" + "\n".join(f"{pad}    {v}," for v in inner) + f"\n{pad}]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def json_body(value: object) -> str:
    """JSON with one top-level field a line and each value compact: short and easy to edit."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value, ensure_ascii=False)
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


@dataclass
class Example:
    id: str
    label: str
    language: str
    code: str


def _path_with_values(path: str) -> str:
    return re.sub(r"{([a-z_]+)}", lambda m: str(PARAMETER_EXAMPLES.get(m.group(1), m.group(1))), path)


def _query_example(parameters: list[dict]) -> dict:
    return {
        p["name"]: PARAMETER_EXAMPLES.get(p["name"], p["name"])
        for p in parameters
        if p["in"] == "query" and (p.get("required") or p["name"] in PARAMETER_EXAMPLES)
    }


def examples(op_id: str, method: str, path: str, op: dict, body: object, base_url: str) -> list[Example]:
    base = base_url.rstrip("/")
    url = base + _path_with_values(path)
    query = _query_example(op.get("parameters", []))
    query_string = "&".join(f"{k}={v}" for k, v in query.items())
    binary = any(
        "format" in media.get("schema", {}) and media["schema"]["format"] == "binary"
        for code, response in op["responses"].items()
        if code.startswith("2")
        for media in response.get("content", {}).values()
    )
    auth = "security" not in op or op["security"] != []

    curl = [f"curl {'-X ' + method.upper() + ' ' if method not in ('get', 'post') else ''}"]
    curl[0] += f'"{url}?{query_string}"' if query_string else url
    if auth:
        curl.append(f'-H "Authorization: Bearer ${PLACEHOLDER_KEY}"')
    if body is not None:
        curl.append('-H "Content-Type: application/json"')
        curl.append("-d '" + json_body(body).replace("'", "'\\''") + "'")
    if binary:
        curl.append("-o result.bin")
    curl_code = " \\\n  ".join(curl)

    args = [f'"{url}"']
    if auth:
        args.append('headers={"Authorization": f"Bearer {os.environ[\'' + PLACEHOLDER_KEY + "']}\"}")
    if query:
        args.append(f"params={py_literal(query, 4)}")
    if body is not None:
        args.append(f"json={py_literal(body, 4)}")
    args.append("timeout=120")
    lines = ["import os", "", "import requests", ""] if auth else ["import requests", ""]
    lines.append(f"response = requests.{method}(")
    lines += [f"    {a}," for a in args]
    lines += [")", "response.raise_for_status()"]
    if binary:
        lines += ['with open("result.bin", "wb") as f:', "    f.write(response.content)"]
    else:
        lines.append("print(response.json())")
    result = [
        Example(f"{op_id}-curl", "curl", "shell", curl_code),
        Example(f"{op_id}-python", "Python (requests)", "python", "\n".join(lines)),
    ]
    sdk = path in SDK_PATHS and isinstance(body, dict)
    if sdk:
        result.append(Example(f"{op_id}-openai", "Python (openai SDK)", "python", _sdk_example(path, body, base)))
    fetch = _fetch_example(method, url, query, body, auth, binary)
    result.append(Example(f"{op_id}-fetch", "JavaScript (fetch)", "javascript", fetch))
    if sdk:
        result.append(
            Example(f"{op_id}-openai-js", "JavaScript (openai SDK)", "javascript", _js_sdk_example(path, body, base))
        )
    return result


def js_literal(value: object, indent: int = 0, expand: bool = False) -> str:
    """A value as JavaScript source, laid out as prettier would for short structures (``expand``: never on one line)."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        parts = [f"{_js_key(k)}: {js_literal(v, indent + 2)}" for k, v in value.items()]
        one_line = "{ " + ", ".join(parts) + " }"
        if not expand and len(one_line) + indent < 72 and "\n" not in one_line:
            return one_line
        return "{\n" + "".join(f"{pad}  {part},\n" for part in parts) + pad + "}"
    if isinstance(value, list) and value:
        parts = [js_literal(v, indent + 2) for v in value]
        one_line = "[" + ", ".join(parts) + "]"
        if len(one_line) + indent < 72 and "\n" not in one_line:
            return one_line
        return "[\n" + "".join(f"{pad}  {part},\n" for part in parts) + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def _js_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", name) else json.dumps(name)


JS_KEY = f"process.env.{PLACEHOLDER_KEY}"


def _fetch_example(method: str, url: str, query: dict, body: object, auth: bool, binary: bool) -> str:
    """``fetch`` (Node 18+ or a browser's, as an ES module: top-level ``await``)."""
    target = url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    options = []
    if method != "get":
        options.append(f'  method: "{method.upper()}",')
    headers = []
    if auth:
        headers.append(f"    Authorization: `Bearer ${{{JS_KEY}}}`,")
    if body is not None:
        headers.append('    "Content-Type": "application/json",')
    if headers:
        options += ["  headers: {", *headers, "  },"]
    if body is not None:
        options.append(f"  body: JSON.stringify({js_literal(body, 2)}),")
    lines = ['import { writeFile } from "node:fs/promises";', ""] if binary else []
    call = f'const response = await fetch("{target}"' + (", {" if options else ");")
    lines.append(call)
    if options:
        lines += [*options, "});"]
    lines.append("if (!response.ok) throw new Error((await response.json()).error.message);")
    if binary:
        lines.append('await writeFile("result.bin", Buffer.from(await response.arrayBuffer()));')
    else:
        lines.append("console.log(await response.json());")
    return "\n".join(lines)


def _js_sdk_example(path: str, body: dict, base: str) -> str:
    """The official ``openai`` npm package pointed at this server (ES module: top-level ``await``)."""
    head = [
        'import OpenAI from "openai";',
        "",
        f'const client = new OpenAI({{ baseURL: "{base}/v1", apiKey: {JS_KEY} }});',
    ]
    if path == "/v1/chat/completions":
        return "\n".join(
            [
                *head,
                f"const completion = await client.chat.completions.create({js_literal(body, expand=True)});",
                "console.log(completion.choices[0].message.content);",
                'console.log(completion.usage.cost_credits, "credits");',
            ]
        )
    return "\n".join(
        [
            *head,
            "// /v1/chat is not an SDK method: post to it with the SDK's own client.",
            f'const completion = await client.post("/chat", {{ body: {js_literal(body, expand=True)} }});',
            "console.log(completion.choices[0].message.content);",
        ]
    )


def _sdk_example(path: str, body: dict, base: str) -> str:
    head = [
        "import os",
        "",
        "from openai import OpenAI",
        "",
        f'client = OpenAI(base_url="{base}/v1", api_key=os.environ["{PLACEHOLDER_KEY}"])',
    ]
    if path == "/v1/chat/completions":
        kwargs = [f"    {k}={py_literal(v, 4)}," for k, v in body.items()]
        return "\n".join(
            [
                *head,
                "completion = client.chat.completions.create(",
                *kwargs,
                ")",
                "print(completion.choices[0].message.content)",
                'print(completion.usage.model_extra["cost_credits"], "credits")',
            ]
        )
    return "\n".join(
        [
            *head,
            "# /v1/chat is not an SDK method: post to it with the SDK's own client.",
            "completion = client.post(",
            '    "/chat",',
            f"    body={py_literal(body, 4)},",
            "    cast_to=object,",
            ")",
            'print(completion["choices"][0]["message"]["content"])',
        ]
    )


# -- example responses and headers ----------------------------------------------------

# Headers of (nearly) every answer: the reference lists them once, in its Headers section.
COMMON_HEADERS = frozenset(
    (
        "X-Request-Id",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "Retry-After",
        "Idempotent-Replayed",
    )
)
# Request headers the document cannot describe as parameters of one operation.
REQUEST_HEADERS = {
    "Authorization": "`Bearer` and your API key (or send the key in `X-API-Key`).",
    "X-API-Key": "Your API key, instead of `Authorization`.",
    "Content-Type": "`application/json` for every request with a body.",
    "Prefer": "`wait=N` (N ≤ 30) on a media job's submit: wait up to N seconds for it to finish.",
}


def response_example(op_id: str, op: dict) -> Example | None:
    """The success answer of an operation as an example: its model's example, or what a file download sends."""
    code, success = _success(op)
    if not code:
        return None
    for content_type, media in success.get("content", {}).items():
        if "example" in media:
            return Example(f"{op_id}-response", f"{code} response", "json", json.dumps(media["example"], indent=2))
        if media.get("schema", {}).get("format") == "binary":
            shown = "image/png" if content_type == "*/*" else content_type
            text = (
                f"HTTP/1.1 {code} {_phrase(code)}\nContent-Type: {shown}\nContent-Length: 482113\n\n(the file's bytes)"
            )
            return Example(f"{op_id}-response", f"{code} response", "text", text)
    return None


def request_headers(spec: dict) -> list[tuple[str, Markup]]:
    """Every request header: the authentication headers, the fixed ones and header parameters in the document."""
    found = dict(REQUEST_HEADERS)
    for methods in spec.get("paths", {}).values():
        for op in methods.values():
            for param in op.get("parameters", []):
                if param["in"] == "header":
                    found.setdefault(param["name"], param.get("description", ""))
    return [(name, inline(text)) for name, text in found.items()]


def response_headers(spec: dict) -> list[tuple[str, Markup]]:
    """Every response header the document names, with its first description, common ones first."""
    found: dict[str, str] = {}
    for methods in spec.get("paths", {}).values():
        for op in methods.values():
            if op.get("x-audience") == "operator":
                continue
            for response in op.get("responses", {}).values():
                for name, header in response.get("headers", {}).items():
                    found.setdefault(name, header.get("description", ""))
    order = sorted(found, key=lambda name: (name not in COMMON_HEADERS, name))
    return [(name, inline(found[name])) for name in order]


# -- operations -----------------------------------------------------------------------


@dataclass
class Parameter:
    name: str
    location: str
    type: str
    required: bool
    constraints: list[Markup]
    description: Markup


@dataclass
class ResponseCode:
    code: str
    phrase: str
    meaning: Markup
    content_types: list[str]
    headers: list[tuple[str, str]]


@dataclass
class Operation:
    id: str
    anchor: str
    method: str
    path: str
    tag: str
    summary: Markup
    description: Markup
    auth: bool
    parameters: list[Parameter]
    body_schema: str | None
    body_description: Markup
    body_fields: list[FieldRow]
    response_schema: str | None
    response_description: Markup
    response_fields: list[FieldRow]
    response_content_types: list[str]
    responses: list[ResponseCode]
    examples: list[Example]
    example_body: object = None
    response_example: Example | None = None
    operator: bool = False


@dataclass
class ErrorStatus:
    status: str
    phrase: str
    meaning: Markup
    types: list[str]
    codes: list[str]


@dataclass
class Reference:
    title: str
    version: str
    description: Markup
    base_url: str
    auth_headers: list[str]
    tags: list[tuple[str, list[Operation]]]
    operations: list[Operation]
    errors: list[ErrorStatus]
    error_fields: list[FieldRow]
    models: dict[str, str] = field(default_factory=dict)
    guides: dict[str, Example] = field(default_factory=dict)
    quickstart: list[Example] = field(default_factory=list)
    operator_tags: list[tuple[str, list[Operation]]] = field(default_factory=list)
    request_headers: list[tuple[str, Markup]] = field(default_factory=list)
    response_headers: list[tuple[str, Markup]] = field(default_factory=list)


def _parameter(param: dict, spec: dict) -> Parameter:
    schema = param.get("schema", {})
    note = param.get("description") or PARAMETER_NOTES.get(param["name"], "")
    if param["in"] == "path" and not note:
        note = f"The `{param['name']}` of the object."
    return Parameter(
        name=param["name"],
        location=param["in"],
        type=type_label(schema, spec, show_null=bool(param.get("required"))),
        required=bool(param.get("required")),
        constraints=[inline(c) for c in constraints(schema)],
        description=inline(note),
    )


def _phrase(code: str) -> str:
    try:
        return HTTPStatus(int(code)).phrase
    except ValueError:
        return ""


def _response_codes(op: dict) -> list[ResponseCode]:
    result = []
    for code, response in sorted(op["responses"].items()):
        if code.startswith("2"):
            meaning = op.get("summary", "") + "." if code == "200" else "Accepted: the job is queued."
            if code == "202":
                meaning += " With `Prefer: wait=N` a job that finishes in time comes back as `200`."
        else:
            meaning = response.get("description", "")
        headers = [
            (name, h.get("description", ""))
            for name, h in response.get("headers", {}).items()
            if name not in COMMON_HEADERS
        ]
        result.append(ResponseCode(code, _phrase(code), inline(meaning), list(response.get("content", {})), headers))
    return result


def _success(op: dict) -> tuple[str, dict]:
    for code, response in sorted(op["responses"].items()):
        if code.startswith("2"):
            return code, response
    return "", {}


def operation(path: str, method: str, op: dict, spec: dict, base_url: str, models: dict[str, str]) -> Operation:
    op_id = op.get("operationId") or f"{method}_{slug(path)}"
    body_ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    body_schema = resolve(body_ref, spec) if body_ref else None
    body = fill(example_value(body_ref, spec), models) if body_ref else None
    _, success = _success(op)
    response_ref = None
    for media in success.get("content", {}).values():
        if ref_name(media.get("schema", {})):
            response_ref = media["schema"]
            break
    response_schema = resolve(response_ref, spec) if response_ref else None
    return Operation(
        id=op_id,
        anchor="op-" + slug(op_id),
        method=method.upper(),
        path=path,
        tag=(op.get("tags") or ["Other"])[0],
        summary=inline(op.get("summary", "")),
        description=inline(op.get("description", "")),
        auth=op.get("security") != [],
        parameters=[_parameter(p, spec) for p in op.get("parameters", [])],
        body_schema=ref_name(body_ref) if body_ref else None,
        body_description=inline(body_schema.get("description", "")) if body_schema else Markup(""),
        body_fields=field_rows(body_ref, spec, FIELD_NOTES) if body_ref else [],
        response_schema=ref_name(response_ref) if response_ref else None,
        response_description=inline(response_schema.get("description", "")) if response_schema else Markup(""),
        response_fields=field_rows(response_ref, spec, max_depth=1) if response_ref else [],
        response_content_types=list(success.get("content", {})),
        responses=_response_codes(op),
        examples=examples(slug(op_id), method, path, op, body, base_url),
        example_body=body,
        response_example=response_example(slug(op_id), op),
        operator=op.get("x-audience") == "operator",
    )


def _error_classes() -> list[type[errors.BrokerError]]:
    found, todo = [], [errors.BrokerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def error_statuses(meanings: dict[str, str]) -> list[ErrorStatus]:
    """Each documented error status with its meaning, and the ``type`` / ``code`` values it carries."""
    classes = _error_classes()
    result = []
    for status, meaning in sorted(meanings.items()):
        matching = [cls for cls in classes if str(cls.status) == status]
        types = list(dict.fromkeys(cls.type for cls in matching))
        codes = list(dict.fromkeys([cls.code for cls in matching] + EXTRA_ERROR_CODES.get(status, [])))
        result.append(ErrorStatus(status, _phrase(status), inline(meaning), types, codes))
    return result


def default_models(enabled: dict[str, list[str]]) -> dict[str, str]:
    """Models used in the examples: ``demo`` ones when that provider is on, else the first enabled of each kind.

    ``enabled`` maps a kind (``chat``, ``tts``, ``image``, ``music``) to the enabled model ids, in table order.
    """
    fallback = {"chat": "openai/gpt-4o-mini", "tts": "elevenlabs/eleven_flash_v2_5", "image": "openai/gpt-image-1"}
    fallback["music"] = "suno/V4_5ALL"
    fallback["embedding"] = "openai/text-embedding-3-small"
    models = {}
    for kind, default in fallback.items():
        ids = enabled.get(kind, [])
        demo = [i for i in ids if i.startswith("demo/")]
        models[kind] = (demo or ids or [default])[0]
    # The Responses API is served for OpenAI models only.
    models["responses"] = next((i for i in enabled.get("chat", []) if i.startswith("openai/")), "openai/gpt-4o-mini")
    # Anthropic's Messages API is shown with an Anthropic model (any chat model works there).
    models["messages"] = next((i for i in enabled.get("chat", []) if i.startswith("anthropic/")), models["chat"])
    provider, _, bare = models["chat"].partition("/")
    models["chat_provider"], models["chat_model"] = provider, bare
    models["voice_id"] = "demo" if models["tts"].startswith("demo/") else "21m00Tcm4TlvDq8ikWAM"
    return models


def reference(spec: dict, base_url: str, error_meanings: dict[str, str], models: dict[str, str]) -> Reference:
    """The whole reference page, from the OpenAPI document."""
    operations = []
    for path, methods in spec.get("paths", {}).items():
        for method in sorted(methods, key=lambda m: METHOD_ORDER.get(m, 9)):
            operations.append(operation(path, method, methods[method], spec, base_url, models))
    tags: dict[str, list[Operation]] = {}
    operator_tags: dict[str, list[Operation]] = {}
    for op in operations:
        (operator_tags if op.operator else tags).setdefault(op.tag, []).append(op)
    headers = []
    for scheme in spec.get("components", {}).get("securitySchemes", {}).values():
        if scheme.get("type") == "http" and scheme.get("scheme") == "bearer":
            headers.append("Authorization: Bearer YOUR_KEY")
        elif scheme.get("type") == "apiKey" and scheme.get("in") == "header":
            headers.append(f"{scheme['name']}: YOUR_KEY")
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    has_error_schema = "ErrorResponse" in spec.get("components", {}).get("schemas", {})
    return Reference(
        title=spec.get("info", {}).get("title", "API"),
        version=spec.get("info", {}).get("version", ""),
        description=inline(spec.get("info", {}).get("description", "")),
        base_url=base_url.rstrip("/"),
        auth_headers=headers,
        tags=list(tags.items()),
        operator_tags=list(operator_tags.items()),
        operations=operations,
        errors=error_statuses(error_meanings),
        error_fields=field_rows(error_ref, spec, ERROR_NOTES) if has_error_schema else [],
        models=models,
        guides=guide_examples(base_url, models),
        quickstart=quickstart(base_url, models["chat"]),
        request_headers=request_headers(spec),
        response_headers=response_headers(spec),
    )


def quickstart(base_url: str, model: str) -> list[Example]:
    """A first call: curl, the ``openai`` SDK for Python, then for JavaScript, then ``fetch`` (in that order)."""
    base = base_url.rstrip("/")
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    curl = (
        f"curl {base}/v1/chat/completions \\\n"
        f'  -H "Authorization: Bearer ${PLACEHOLDER_KEY}" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d '{json.dumps(body)}'"
    )
    return [
        Example("qs-curl", "curl", "shell", curl),
        Example("qs-python", "Python (openai SDK)", "python", _sdk_example("/v1/chat/completions", body, base)),
        Example("qs-js", "JavaScript (openai SDK)", "javascript", _js_sdk_example("/v1/chat/completions", body, base)),
        Example(
            "qs-fetch",
            "JavaScript (fetch)",
            "javascript",
            _fetch_example("post", base + "/v1/chat/completions", {}, body, True, False),
        ),
    ]


def guide_examples(base_url: str, models: dict[str, str]) -> dict[str, Example]:
    """Code for the error, streaming and job guides, with this server's base URL and example models."""
    base = base_url.rstrip("/")
    key = f'-H "Authorization: Bearer ${PLACEHOLDER_KEY}"'
    model = json.dumps(models["chat"])
    chunk = f'{{"id":"chatcmpl-3f9c…","object":"chat.completion.chunk","created":1767225600,"model":{model},"choices":'
    rest = '"logprobs":null,"finish_reason":'
    usage = (
        '{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,'
        '"prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":0,"audio_tokens":0},'
        '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
        '"rejected_prediction_tokens":0},"cost_credits":0.00405}'
    )
    sse = "\n\n".join(
        [
            f'data: {chunk}[{{"index":0,"delta":{{"role":"assistant","content":""}},{rest}null}}],"usage":null}}',
            f'data: {chunk}[{{"index":0,"delta":{{"content":"Hello"}},{rest}null}}],"usage":null}}',
            f'data: {chunk}[{{"index":0,"delta":{{}},{rest}"stop"}}],"usage":null}}',
            f'data: {chunk}[],"usage":{usage}}}',
            "data: [DONE]",
        ]
    )
    envelope = {
        "error": {
            "type": "invalid_request_error",
            "code": "model_not_found",
            "message": "The model 'nope/model' does not exist or is not available. "
            "GET /v1/models lists the models you can use.",
            "param": "model",
        }
    }
    stream_python = f"""import os

from openai import OpenAI

client = OpenAI(base_url="{base}/v1", api_key=os.environ["{PLACEHOLDER_KEY}"])
stream = client.chat.completions.create(
    model="{models["chat"]}",
    messages=[{{"role": "user", "content": "Write a haiku about the sea"}}],
    stream=True,
    stream_options={{"include_usage": True}},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print()
        print("charged", chunk.usage.model_extra["cost_credits"], "credits")"""
    stream_body = {
        "model": models["chat"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hello"}],
    }
    stream_curl = (
        f"curl -N {base}/v1/chat/completions \\\n  {key} \\\n"
        f"  -H \"Content-Type: application/json\" \\\n  -d '{json.dumps(stream_body)}'"
    )
    tts = {"model": models["tts"], "text": "Hello from the broker", "voice_id": models["voice_id"]}
    image = {"model": models["image"], "prompt": "a lighthouse at dawn", "quality": "low"}
    job = PARAMETER_EXAMPLES["job_id"]
    jobs_curl = f"""curl -i {base}/v1/tts \\
  {key} \\
  -H "Content-Type: application/json" \\
  -d '{json.dumps(tts)}'
# HTTP/1.1 202 ACCEPTED
# Location: /v1/jobs/{job}
# X-Credits-Held: …

curl {base}/v1/jobs/{job} {key}
curl "{base}/v1/jobs/{job}/content?index=0" \\
  {key} -o speech.{"wav" if models["tts"].startswith("demo/") else "mp3"}

# Wait up to 20 seconds instead of polling:
curl {base}/v1/image {key} \\
  -H "Content-Type: application/json" -H "Prefer: wait=20" \\
  -d '{json.dumps(image)}'

# Cancel a job that is still queued:
curl -X DELETE {base}/v1/jobs/{job} {key}"""
    music = {"model": models["music"], "prompt": "a calm piano piece", "instrumental": True}
    jobs_python = f"""import os
import time

import requests

BASE = "{base}/v1"
HEADERS = {{"Authorization": f"Bearer {{os.environ['{PLACEHOLDER_KEY}']}}"}}

response = requests.post(
    f"{{BASE}}/music",
    headers={{**HEADERS, "Prefer": "wait=10"}},
    json={py_literal(music, 4)},
    timeout=60,
)
response.raise_for_status()
job = response.json()
while job["status"] in ("queued", "running"):
    time.sleep(2)
    job = requests.get(f"{{BASE}}/jobs/{{job['id']}}", headers=HEADERS, timeout=30).json()

if job["status"] != "succeeded":
    raise SystemExit(f"job {{job['status']}}: {{job['error']}}")
print("charged", job["cost_credits"], "credits")
for result in job["results"]:
    content = requests.get(
        f"{{BASE}}/jobs/{{job['id']}}/content", params={{"index": result["index"]}}, headers=HEADERS, timeout=120
    )
    content.raise_for_status()
    with open(f"song-{{result['index']}}", "wb") as f:
        f.write(content.content)"""
    found = [
        Example("error-envelope", "Error body", "json", json.dumps(envelope, indent=2)),
        Example("sse-example", "The event stream", "text", sse),
        Example("sse-python", "Python (openai SDK)", "python", stream_python),
        Example("sse-curl", "curl", "shell", stream_curl),
        Example("jobs-curl", "curl", "shell", jobs_curl),
        Example("jobs-python", "Python (requests): submit, poll, download", "python", jobs_python),
    ]
    return {example.id.replace("-", "_"): example for example in found}
