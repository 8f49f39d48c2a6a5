"""The ``model`` member of a JSON request body: finding it early, and replacing it.

Routing on the body's model (``match.model``) used to read the whole body first. Most
bodies are small and arrive whole, and are parsed whole; for one that streams,
``ModelScan`` reads the members at the start of the object as they arrive and stops as
soon as ``model`` is among them, so that the rest streams to the backend instead of
waiting in memory. It gives up (and the caller reads the body whole, within its limit)
once a member it would have to skip is an object or an array: skipping those needs a
parser, and in JSON produced by the usual clients ``model`` comes early or the body is
small. (A body naming ``model`` twice is routed on the first when found early, on the
last when parsed whole; such a body is not valid input to any model server.)

``replace_model`` is a backend's ``model_name``: the body with its top-level ``model``
replaced, changing nothing else when ``model`` comes early, and otherwise re-encoding
the document.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import orjson

_WS = rb"[ \t\r\n]*"
_STRING = rb'"(?:[^"\\]|\\.)*"'
_SCALAR = rb"(?:" + _STRING + rb"|-?[0-9][0-9.eE+-]*|true|false|null)"
# One member whose value is a scalar, and what follows it ("," or "}").
_MEMBER = re.compile(
    _WS + rb"(" + _STRING + rb")" + _WS + rb":" + _WS + rb"(" + _SCALAR + rb")" + _WS + rb"([,}])"
)
# A member whose value is an object or an array: the scan cannot skip it.
_NESTED = re.compile(_WS + _STRING + _WS + rb":" + _WS + rb"[\[{]")
_OPEN = re.compile(_WS + rb"\{" + _WS + rb"(\}?)")
# Without a match in this many bytes past the last member, the body is not one this
# scan reads (a member of many megabytes): read it whole.
_MAX_MEMBER_BYTES = 64 * 1024


class Scan(enum.Enum):
    FOUND = "found"  # the model is known (``model``: the name, or None for none)
    MORE = "more"  # the bytes so far do not tell yet
    WHOLE = "whole"  # only the whole body tells: read it and parse it


@dataclass(slots=True)
class ModelScan:
    """Reads a body's leading members as it arrives. Feed it the whole body so far."""

    position: int = -1  # after the last member read; -1 before the opening brace
    model: str | None = None
    span: tuple[int, int] | None = None  # where the model's JSON string is in the body

    def feed(self, data: bytes | bytearray) -> Scan:
        if self.position < 0:
            opening = _OPEN.match(data)
            if opening is None:
                if data.strip(b" \t\r\n") in (b"", b"{") and len(data) < _MAX_MEMBER_BYTES:
                    return Scan.MORE
                return Scan.WHOLE  # not an object, or not JSON at all: let the parser say
            if opening.group(1):
                return Scan.FOUND  # {}: no model
            self.position = opening.end()
        while True:
            member = _MEMBER.match(data, self.position)
            if member is None:
                if _NESTED.match(data, self.position) is not None:
                    return Scan.WHOLE
                if len(data) - self.position > _MAX_MEMBER_BYTES:
                    return Scan.WHOLE
                return Scan.MORE
            self.position = member.end()
            try:
                key = orjson.loads(member.group(1))
            except orjson.JSONDecodeError:
                return Scan.WHOLE
            if key == "model":
                value = member.group(2)
                if value.startswith(b'"'):
                    try:
                        self.model = orjson.loads(value)
                    except orjson.JSONDecodeError:
                        return Scan.WHOLE
                    self.span = member.span(2)
                return Scan.FOUND
            if member.group(3) == b"}":
                return Scan.FOUND  # the object ended without a model


def body_model(body: bytes) -> str | None:
    """The ``model`` field of a JSON object body, or None."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict):
        model = document.get("model")
        if isinstance(model, str):
            return model
    return None


def replace_model(body: bytes, name: str) -> bytes | None:
    """``body`` with its top-level ``"model"`` string set to ``name``; None when the body
    is not a JSON object with a string ``model`` (it is then sent as it is)."""
    scan = ModelScan()
    spliced: bytes | None = None
    if scan.feed(body) is Scan.FOUND and scan.span is not None:
        start, end = scan.span
        spliced = body[:start] + orjson.dumps(name) + body[end:]
    try:
        document = orjson.loads(spliced if spliced is not None else body)
    except orjson.JSONDecodeError:
        # Valid JSON orjson cannot hold (an integer past 64 bits, say): the splice, which
        # touched nothing else, stands on its own.
        return spliced
    if not isinstance(document, dict) or not isinstance(document.get("model"), str):
        return None
    if document["model"] == name and spliced is not None:
        return spliced
    # The model came late (or twice): re-encoded, with exactly one model.
    document["model"] = name
    return orjson.dumps(document)
