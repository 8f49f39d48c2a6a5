"""Protocol-aware extraction of the comparable content of a model server's answer.

An answer becomes a flat, ordered mapping from JSON-path-like field names to leaf values:

    $.outputs[0].data                      Tensor (numbers, with their shape)
    $.choices[0].message.content           str
    $.usage.prompt_tokens                  int
    $                                      bytes (a body that is not JSON)

Path syntax: ``$`` is the root; an object key that is an identifier
(``[A-Za-z_][A-Za-z0-9_]*``) is written ``.key``, any other key ``["key"]`` with JSON string
escaping; a list index is ``[3]``. A list whose leaves are all numbers and which is
rectangular (every sub-list at one depth has the same length) is one :class:`Tensor` leaf,
so that a score vector is compared as a vector and not element by element. An empty object
is the leaf :data:`Empty.OBJECT`, so ``{"a": {}}`` still differs from ``{}``.

Which parts of an answer are *content* depends on the protocol:

- **Open Inference Protocol** (KServe v2): each ``outputs[i]`` with its ``name``,
  ``datatype``, ``parameters`` and ``data``; numeric ``data`` becomes a Tensor of the
  declared ``shape`` (OIP sends data flat, the shape says how to read it). ``model_name``,
  ``model_version`` and ``id`` are identity, not content: champion and challenger differ
  there by construction, so they are dropped.
- **TF Serving**: the whole body (``predictions``, or ``outputs`` of the columnar format).
- **OpenAI-compatible**: ``choices`` (message role/content/tool calls, completion text,
  finish reason), ``data[*].embedding`` of the embeddings API, ``usage`` and ``error``.
  ``id``, ``created``, ``model``, ``system_fingerprint`` and other envelope fields are
  dropped, and so are ``logprobs``: per-token entries can't be aligned once two texts
  diverge and would flood the per-field report. A streamed (SSE) answer is reassembled
  into the non-streamed shape first, so a streamed and a non-streamed answer compare
  equal when they say the same thing.
- **JSON**: the whole document. **Bytes**: the whole body as one ``bytes`` leaf.

``Protocol.AUTO`` detects the protocol from each body on its own; a protocol forced in the
settings falls back to plain JSON for a body that doesn't have that protocol's shape (an
error document, say), and every protocol falls back to bytes for a body that isn't JSON.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

import orjson


class Protocol(enum.StrEnum):
    AUTO = "auto"
    OIP = "oip"
    TFSERVING = "tfserving"
    OPENAI = "openai"
    JSON = "json"
    BYTES = "bytes"


class Empty(enum.Enum):
    """The leaf for ``{}``: an empty object has no leaves but is not the same as absence."""

    OBJECT = "{}"


@dataclass(frozen=True, slots=True)
class Tensor:
    """A rectangular numeric array, stored flat in row-major order."""

    values: tuple[float, ...]
    shape: tuple[int, ...]

    @property
    def row_length(self) -> int:
        """Length of the last axis: class scores live along it."""
        return self.shape[-1] if self.shape else len(self.values)

    def rows(self) -> list[tuple[float, ...]]:
        """The tensor cut along its last axis (one row per sample of a batch)."""
        n = self.row_length
        if n == 0:
            return []
        return [self.values[i : i + n] for i in range(0, len(self.values), n)]


Value: TypeAlias = "bool | int | float | str | bytes | Tensor | Empty | None"


class FieldKind(enum.StrEnum):
    NULL = "null"
    BOOL = "bool"
    NUMBER = "number"
    TEXT = "text"
    BYTES = "bytes"
    VECTOR = "vector"
    OBJECT = "object"


def kind_of(value: Value) -> FieldKind:
    kind = _KIND_OF_TYPE.get(type(value))
    if kind is not None:  # the exact types JSON decoding produces: one lookup
        return kind
    # bool before number: bool is an int subclass, but true and 1 are different JSON.
    if value is None:
        return FieldKind.NULL
    if isinstance(value, bool):
        return FieldKind.BOOL
    if isinstance(value, int | float):
        return FieldKind.NUMBER
    if isinstance(value, str):
        return FieldKind.TEXT
    if isinstance(value, bytes):
        return FieldKind.BYTES
    if isinstance(value, Tensor):
        return FieldKind.VECTOR
    return FieldKind.OBJECT


_KIND_OF_TYPE: dict[type, FieldKind] = {
    type(None): FieldKind.NULL,
    bool: FieldKind.BOOL,
    int: FieldKind.NUMBER,
    float: FieldKind.NUMBER,
    str: FieldKind.TEXT,
    bytes: FieldKind.BYTES,
    Tensor: FieldKind.VECTOR,
    Empty: FieldKind.OBJECT,
}


@dataclass(frozen=True, slots=True)
class Extracted:
    """The comparable content of one answer, and the protocol it was read with."""

    protocol: Protocol
    fields: Mapping[str, Value]

    @property
    def vectors(self) -> frozenset[str]:
        return frozenset(p for p, v in self.fields.items() if isinstance(v, Tensor))


# --------------------------------------------------------------------------- paths

ROOT = "$"


def key_path(parent: str, key: str) -> str:
    # An ASCII identifier is exactly [A-Za-z_][A-Za-z0-9_]*: rendered in dotted form.
    if key.isascii() and key.isidentifier():
        return f"{parent}.{key}"
    # json, not orjson: keys read by the NaN fallback may hold lone surrogates.
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def index_path(parent: str, index: int) -> str:
    return f"{parent}[{index}]"


# Any one segment of a rendered path; used by "*" and "**" in patterns.
_ANY_KEY = r'(?:\.[^.\[]+|\["(?:[^"\\]|\\.)*"\])'
_ANY_SEGMENT = rf"(?:{_ANY_KEY}|\[\d+\])"
_PATTERN_SEGMENT = re.compile(
    r"""
      (?P<deep>\.\*\*)
    | \.(?P<name>[^.\[\]"]+)
    | \[(?P<index>\d+|\*)\]
    | \[(?P<quoted>"(?:[^"\\]|\\.)*")\]
    """,
    re.VERBOSE,
)


def _segment_regex(m: re.Match[str]) -> str:
    if m.group("deep"):
        return f"{_ANY_SEGMENT}*"
    name = m.group("name")
    if name is not None:
        if name == "*":
            return _ANY_KEY
        if "*" in name:
            # Only keys rendered in dotted form (identifiers) can match a partial wildcard.
            return r"\." + r"[^.\[]*".join(re.escape(part) for part in name.split("*"))
        return re.escape(key_path("", name))
    index = m.group("index")
    if index is not None:
        return r"\[\d+\]" if index == "*" else re.escape(f"[{int(index)}]")
    key = json.loads(m.group("quoted"))
    # A quoted identifier is the same key as its dotted form, which is how paths render it.
    return re.escape(key_path("", key))


def pattern_regex(pattern: str) -> str:
    """Regex source for one path pattern; raises ValueError naming the bad part.

    ``.*`` is any one key, ``[*]`` any one index, ``.**`` any number of segments, and
    ``*`` inside a dotted key is a wildcard within that key. A pattern also matches
    everything below what it names: ``$.usage`` covers ``$.usage.prompt_tokens``.
    """
    if not pattern.startswith(ROOT):
        raise ValueError(f"path pattern must start with '$', got {pattern!r}")
    parts = [r"\$"]
    pos = 1
    while pos < len(pattern):
        m = _PATTERN_SEGMENT.match(pattern, pos)
        if m is None:
            raise ValueError(f"path pattern {pattern!r}: cannot parse at {pattern[pos:]!r}")
        try:
            parts.append(_segment_regex(m))
        except json.JSONDecodeError as exc:
            raise ValueError(f"path pattern {pattern!r}: bad quoted key: {exc}") from None
        pos = m.end()
    # Stop at a segment boundary so that "$.id" covers "$.id.x" but not "$.idx".
    return "".join(parts) + r"(?=$|[.\[])"


class PathMatcher:
    """A set of path patterns compiled once (at config load) into one regex."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, patterns: tuple[str, ...] = ()) -> None:
        self.patterns = patterns
        sources = [pattern_regex(p) for p in patterns]
        self._regex = re.compile("|".join(f"(?:{s})" for s in sources)) if sources else None

    def __contains__(self, path: str) -> bool:
        return self._regex is not None and self._regex.match(path) is not None

    def __repr__(self) -> str:
        return f"PathMatcher({self.patterns!r})"


# --------------------------------------------------------------------------- flattening

Fields: TypeAlias = dict[str, Value]


_NUMERIC_TYPES = frozenset({int, float})


def _as_tensor(items: list[Any]) -> Tensor | None:
    """The list as a Tensor if it is rectangular with only numeric leaves, else None."""
    shape: list[int] = []
    probe: Any = items
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level: list[Any] = items
    for length in shape[1:] if len(shape) > 1 else ():
        below: list[Any] = []
        for node in level:
            if not isinstance(node, list) or len(node) != length:
                return None
            below.extend(node)
        level = below
    # Leaf types by exact type() (bools are ints to Python but not numbers to JSON), in C.
    if not _NUMERIC_TYPES.issuperset(map(type, level)):
        return None
    try:
        return Tensor(tuple(map(float, level)), tuple(shape))
    except OverflowError:  # an integer beyond float range: compare it as a plain number
        return None


def flatten(value: Any, path: str, out: Fields) -> None:
    """Add the leaves of a decoded JSON value under ``path``, in document order.

    Iterative, because orjson accepts nesting deeper than Python's recursion limit.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    push, pop = stack.append, stack.pop
    while stack:
        where, node = pop()
        if isinstance(node, dict):
            if not node:
                out[where] = Empty.OBJECT
            for key in reversed(node):
                push((key_path(where, str(key)), node[key]))
        elif isinstance(node, list):
            tensor = _as_tensor(node)
            if tensor is not None:
                out[where] = tensor
            else:
                stack.extend((index_path(where, i), node[i]) for i in reversed(range(len(node))))
        else:
            out[where] = node


# --------------------------------------------------------------------------- decoding

_JSON_MEDIA = re.compile(r"application/(?:[\w.+-]+\+)?json\Z")
# Python model servers (json.dumps defaults) write these non-standard literals; orjson
# refuses them, the standard library reads them.
_NON_STANDARD_NUMBER = re.compile(rb"NaN|Infinity")
_NOT_JSON = object()


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _parse_json(body: bytes | str) -> Any:
    """The decoded document, or ``_NOT_JSON``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raw = body.encode() if isinstance(body, str) else body
        if not _NON_STANDARD_NUMBER.search(raw):
            return _NOT_JSON
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _may_be_json(body: bytes, content_type: str) -> bool:
    """Whether AUTO should try JSON: declared JSON, undeclared, or obviously a document."""
    media = _media_type(content_type)
    if not media or _JSON_MEDIA.match(media):
        return True
    return body.lstrip()[:1] in (b"{", b"[")


# An event stream opens with comments (keep-alives) or a field; no JSON document does.
# Possessive quantifiers: no backtracking on a long run of blank lines.
_SSE_START = re.compile(rb"\s*+(?::[^\r\n]*+\s*+)*+(?:data|event|id|retry):")


def _is_sse(body: bytes, content_type: str) -> bool:
    return _media_type(content_type) == "text/event-stream" or bool(_SSE_START.match(body))


def _sse_payloads(body: bytes) -> list[bytes]:
    """The ``data`` of each server-sent event, per the WHATWG event-stream grammar."""
    payloads: list[bytes] = []
    data: list[bytes] = []
    for line in body.splitlines():
        if not line:
            if data:
                payloads.append(b"\n".join(data))
                data = []
            continue
        if line.startswith(b":"):  # comment, e.g. keep-alive
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:  # a final event without its blank line: keep it rather than lose content
        payloads.append(b"\n".join(data))
    return payloads


# --------------------------------------------------------------------------- detection


def _is_oip(doc: Any) -> bool:
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    return (
        isinstance(outputs, list)
        and bool(outputs)
        and all(
            isinstance(o, dict) and "data" in o and ("datatype" in o or "shape" in o)
            for o in outputs
        )
    )


def _is_openai(doc: Any) -> bool:
    if not isinstance(doc, dict):
        return False
    choices = doc.get("choices")
    if isinstance(choices, list) and choices:
        return all(
            isinstance(c, dict) and ("message" in c or "text" in c or "delta" in c) for c in choices
        )
    if doc.get("object") in ("chat.completion", "text_completion"):
        return isinstance(choices, list)
    data = doc.get("data")
    return (
        doc.get("object") == "list"
        and isinstance(data, list)
        and all(isinstance(d, dict) and "embedding" in d for d in data)
    )


def _is_tfserving(doc: Any) -> bool:
    return isinstance(doc, dict) and ("predictions" in doc or "outputs" in doc)


def detect(doc: Any) -> Protocol:
    """The protocol of a decoded JSON document (never AUTO or BYTES)."""
    if _is_oip(doc):
        return _OIP
    if _is_openai(doc):
        return _OPENAI
    if _is_tfserving(doc):
        return _TFSERVING
    return _JSON


# --------------------------------------------------------------------------- extractors


def _oip_fields(doc: dict[str, Any]) -> Fields:
    out: Fields = {}
    for i, output in enumerate(doc["outputs"]):
        base = index_path("$.outputs", i)
        for key, value in output.items():
            if key == "data":
                _oip_data(base, value, output.get("shape"), out)
            elif key != "shape" and value is not None:
                # shape travels with the data; "parameters": null is the same as absent.
                flatten(value, key_path(base, key), out)
    if doc.get("parameters") is not None:
        flatten(doc["parameters"], "$.parameters", out)
    return out


def _declared_shape(shape: Any, size: int) -> tuple[int, ...] | None:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    return tuple(shape) if math.prod(shape) == size else None


def _oip_data(base: str, data: Any, shape: Any, out: Fields) -> None:
    path = key_path(base, "data")
    tensor = _as_tensor(data) if isinstance(data, list) else None
    if tensor is not None:
        declared = _declared_shape(shape, len(tensor.values))
        # A shape that disagrees with the data is the server's bug; the data's own
        # nesting is then the better description, and a mismatch still shows.
        out[path] = Tensor(tensor.values, declared) if declared is not None else tensor
        return
    # BYTES and BOOL tensors: compare element by element, and the shape explicitly since
    # no Tensor carries it.
    flatten(data, path, out)
    if shape is not None:
        out[key_path(base, "shape")] = orjson.dumps(shape).decode()


def _tfserving_fields(doc: Any) -> Fields:
    out: Fields = {}
    flatten(doc, ROOT, out)
    return out


_json_fields = _tfserving_fields


def _ordered_choices(choices: list[Any]) -> list[Any]:
    # Servers number choices with "index"; order by it so n>1 answers line up.
    if all(isinstance(c, dict) and type(c.get("index")) is int for c in choices):
        return sorted(choices, key=lambda c: c["index"])
    return choices


def _openai_fields(doc: dict[str, Any]) -> Fields:
    out: Fields = {}
    choices = doc.get("choices")
    if isinstance(choices, list):
        for i, choice in enumerate(_ordered_choices(choices)):
            _openai_choice(index_path("$.choices", i), choice, out)
    data = doc.get("data")
    if isinstance(data, list):
        for i, item in enumerate(data):
            base = index_path("$.data", i)
            if isinstance(item, dict) and "embedding" in item:
                flatten(item["embedding"], key_path(base, "embedding"), out)
            else:
                flatten(item, base, out)
    for key in ("usage", "error"):
        if doc.get(key) is not None:
            flatten(doc[key], key_path(ROOT, key), out)
    return out


def _openai_choice(base: str, choice: Any, out: Fields) -> None:
    if not isinstance(choice, dict):
        flatten(choice, base, out)
        return
    message = choice.get("message")
    if isinstance(message, dict):
        _openai_message(key_path(base, "message"), message, out)
    if "text" in choice:
        # null and "" both mean "no text"; servers differ on which they send.
        text = choice["text"]
        flatten("" if text is None else text, key_path(base, "text"), out)
    if "finish_reason" in choice:
        flatten(choice["finish_reason"], key_path(base, "finish_reason"), out)


def _openai_message(base: str, message: dict[str, Any], out: Fields) -> None:
    for key, value in message.items():
        path = key_path(base, key)
        if key == "content" and value is None:
            out[path] = ""  # tool-call answers send null, streams reassemble to ""
        elif key == "tool_calls":
            if isinstance(value, list):
                _tool_calls(path, value, out)
            elif value is not None:
                flatten(value, path, out)
        elif value is not None and value != []:
            # refusal, annotations, reasoning_content...: servers differ on whether they
            # send null, [] or nothing, and all three say the same thing.
            flatten(value, path, out)


def _tool_calls(base: str, calls: list[Any], out: Fields) -> None:
    for j, call in enumerate(calls):
        path = index_path(base, j)
        if not isinstance(call, dict):
            flatten(call, path, out)
            continue
        for key, value in call.items():
            if key in ("id", "index"):  # random per call / a streaming artefact
                continue
            if key == "function" and isinstance(value, dict):
                _function(key_path(path, key), value, out)
            else:
                flatten(value, key_path(path, key), out)


def _function(base: str, function: dict[str, Any], out: Fields) -> None:
    for key, value in function.items():
        path = key_path(base, key)
        if key == "arguments" and isinstance(value, str):
            # Arguments are JSON text written by the model: compare what they say, not
            # their key order or spacing.
            parsed = _parse_json(value)
            if isinstance(parsed, dict | list):
                flatten(parsed, path, out)
                continue
        flatten(value, path, out)


# --------------------------------------------------------------------------- streams


def reassemble_openai_stream(body: bytes) -> dict[str, Any] | None:
    """A streamed OpenAI answer rebuilt in the non-streamed shape, or None if it isn't one.

    Chat deltas concatenate per choice ``index`` (role: first one wins), tool calls per
    tool-call ``index``; completion ``text`` concatenates; the last non-null
    ``finish_reason`` and ``usage`` win (usage comes in the last chunk, or in every chunk
    with vLLM's continuous usage stats).
    """
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    error: Any = None
    seen = False
    for payload in _sse_payloads(body):
        if payload.strip() == b"[DONE]":
            break
        chunk = _parse_json(payload)
        if not isinstance(chunk, dict):
            return None
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        if chunk.get("error") is not None:
            error, seen = chunk["error"], True
        if isinstance(chunk.get("choices"), list):
            seen = True
            for choice in chunk["choices"]:
                if not isinstance(choice, dict):
                    return None
                _merge_choice(choices, choice)
    if not seen:
        return None
    doc: dict[str, Any] = {"choices": [_finish_choice(choices[i]) for i in sorted(choices)]}
    if usage is not None:
        doc["usage"] = usage
    if error is not None:
        doc["error"] = error
    return doc


def _merge_choice(choices: dict[int, dict[str, Any]], choice: dict[str, Any]) -> None:
    index = choice.get("index", 0)
    state = choices.setdefault(index if type(index) is int else 0, {"index": index})
    delta = choice.get("delta")
    if isinstance(delta, dict):
        _merge_delta(state.setdefault("message", {}), delta)
    if "text" in choice:
        state["text"] = _concat(state.get("text", ""), choice["text"])
    if choice.get("finish_reason") is not None:
        state["finish_reason"] = choice["finish_reason"]
    else:
        state.setdefault("finish_reason", None)


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if key == "role":
            if value is not None:
                message.setdefault("role", value)
        elif key == "tool_calls":
            if isinstance(value, list):
                calls = message.get("tool_calls")
                if not isinstance(calls, dict):
                    calls = message["tool_calls"] = {}
                for part in value:
                    if isinstance(part, dict):
                        index = part.get("index")
                        # Fragments name their call by index; one without belongs to a new call.
                        index = index if type(index) is int else len(calls)
                        _merge_fragment(calls.setdefault(index, {}), part)
        elif isinstance(value, str):
            message[key] = _concat(message.get(key), value)
        elif value is not None or key not in message:
            message[key] = value


def _concat(existing: Any, value: Any) -> Any:
    """Text deltas append; anything else (a misbehaving server) replaces."""
    if value is None:
        return "" if existing is None else existing
    if isinstance(existing, str) and isinstance(value, str):
        return existing + value
    return value


def _merge_fragment(target: dict[str, Any], part: dict[str, Any]) -> None:
    """Merge a tool-call fragment: strings concatenate, objects merge, others replace."""
    for key, value in part.items():
        if isinstance(value, str) and key not in ("id", "type"):
            target[key] = _concat(target.get(key), value)
        elif isinstance(value, dict):
            inner = target.get(key)
            if not isinstance(inner, dict):
                inner = target[key] = {}
            _merge_fragment(inner, value)
        elif value is not None or key not in target:
            target[key] = value


def _finish_choice(state: dict[str, Any]) -> dict[str, Any]:
    message = state.get("message")
    if isinstance(message, dict) and isinstance(message.get("tool_calls"), dict):
        calls = message["tool_calls"]
        message["tool_calls"] = [calls[k] for k in sorted(calls)]
    return state


# --------------------------------------------------------------------------- entry point


# Protocol members as module constants: on Python 3.11 reading ``Protocol.AUTO`` costs
# about ten times a global lookup, and extract() runs twice per mirrored request.
_AUTO, _OIP, _OPENAI = Protocol.AUTO, Protocol.OIP, Protocol.OPENAI
_TFSERVING, _JSON, _BYTES = Protocol.TFSERVING, Protocol.JSON, Protocol.BYTES


def _bytes(body: bytes) -> Extracted:
    return Extracted(_BYTES, MappingProxyType({ROOT: body}))


def _specific(protocol: Protocol, doc: Any) -> Extracted:
    if protocol is _OIP:
        return Extracted(protocol, MappingProxyType(_oip_fields(doc)))
    if protocol is _OPENAI:
        return Extracted(protocol, MappingProxyType(_openai_fields(doc)))
    if protocol is _TFSERVING:
        return Extracted(protocol, MappingProxyType(_tfserving_fields(doc)))
    return Extracted(_JSON, MappingProxyType(_json_fields(doc)))


_FITS = {_OIP: _is_oip, _OPENAI: _is_openai, _TFSERVING: _is_tfserving}


def extract(body: bytes, content_type: str = "", protocol: Protocol = _AUTO) -> Extracted:
    """The comparable content of an answer body (see the module docstring)."""
    if protocol is _BYTES:
        return _bytes(body)
    if (protocol is _AUTO or protocol is _OPENAI) and _is_sse(body, content_type):
        doc = reassemble_openai_stream(body)
        return _bytes(body) if doc is None else _specific(_OPENAI, doc)
    if protocol is _AUTO and not _may_be_json(body, content_type):
        return _bytes(body)
    doc = _parse_json(body)
    if doc is _NOT_JSON:
        return _bytes(body)
    if protocol is _AUTO:
        return _specific(detect(doc), doc)
    fits = _FITS.get(protocol)
    return _specific(protocol if fits is not None and fits(doc) else _JSON, doc)
