"""Token counts from an answer's OpenAI-style ``usage``.

The proxy never buffers an answer to read it. An answer that arrived whole is read with
``usage_of_answer`` (by the load trace, a batch at a time); a streamed one is handed
chunk by chunk to a ``UsageSniffer``, which reads each chunk as it comes and keeps only
its first few kilobytes and what is still open of a usage object: the last ``"usage"``
object of the answer gives the counts. That covers a plain JSON answer (``usage`` is a
top-level field, usually last) and a streamed SSE answer (the final ``data:`` event
carries ``usage``; earlier ones may carry ``"usage": null``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import msgspec
import orjson

HEAD_BYTES = 8 * 1024
# A usage object still open this many bytes after its key is not one (no server sends
# one this large): what waits for the rest of an open one stays bounded. One that long
# split across chunks is not counted; one that long within a chunk is.
OPEN_USAGE_BYTES = 2 * 1024
_USAGE_KEY = b'"usage"'
_NO_USAGE = b'"usage":null'  # as OpenAI and most servers write it
_NO_USAGE_SPACED = b'"usage": null'  # as Python's json.dumps does
# How a chunk ends when a "usage" key is cut in two by the chunk's end.
_KEY_STARTS = tuple(_USAGE_KEY[:length] for length in range(1, len(_USAGE_KEY)))

# How an event stream (server-sent events) starts: with one of its fields, or a comment.
_EVENT_STREAM_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")

# (prompt_tokens, completion_tokens). A plain tuple: it is made for every traced answer,
# and a NamedTuple's constructor is a Python-level call that costs more than the parse.
TokenCounts = tuple[int, int]

NO_USAGE: TokenCounts = (0, 0)
# _usage_at's answer for a usage object the data ends inside of (compared by identity;
# real counts are never negative).
_CUT_OFF: TokenCounts = (-1, -1)


class UsageSniffer:
    """The usage of a byte stream read chunk by chunk as it arrives, keeping next to
    nothing: the head of the stream (its first HEAD_BYTES, as references to its chunks),
    the counts of the last usage object read, and what came of a usage object still open
    at the end of the last chunk.

    Most answers arrive in one chunk: that one is only referenced, and read whole at the
    end as any answer is (``usage_of_answer``). Once the head is complete it is read and
    let go of, and each chunk after it is read as it comes, while it is still in the
    CPU's caches: a chunk without a ``"usage"`` key other than ``"usage": null`` (or the
    start of one at its end) is looked at by two to four C calls and not kept. A stream's last
    usage object counts, wherever it is, whatever the chunking.

    Copying every chunk's bytes into a tail kept per stream, as this did before, took
    3.4 KB per stream and 1-3 % more CPU per relayed token at 2,000 open streams than
    these scans, whose instructions are more: thousands of tails are never in the CPU's
    caches. An event stream's head is its first chunk alone, as its usage comes in its
    last events, not its first."""

    __slots__ = ("_found", "_head", "_head_limit", "_head_size", "_open")

    def __init__(self) -> None:
        self._head: list[bytes] | None = []  # None once read and let go
        self._head_size = 0
        self._head_limit = HEAD_BYTES
        self._found: TokenCounts | None = None  # the last complete usage object's
        # From a usage key (or the start of one) on, when the last chunk ended before
        # its object did: read again with the next chunk.
        self._open: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        head = self._head
        if head is not None and self._into_head(head, chunk):
            return
        opened = self._open
        if opened is not None:
            if (
                b"}" in chunk
                or not opened.startswith(_USAGE_KEY)
                or _USAGE_KEY in chunk
                or chunk.endswith(_KEY_STARTS)
            ):
                self._read(opened + chunk)
            else:
                # A usage value still open cannot end, nor a new key start, in this chunk:
                # kept, not read again (a server trickling bytes would make every chunk
                # parse what is open so far, in Python).
                data = opened + chunk
                self._open = data if len(data) <= OPEN_USAGE_BYTES else None
        elif chunk.endswith(_KEY_STARTS):
            self._read(chunk)
        else:
            # Read unless each key in it says null, as servers do in every event but the
            # last: a scan or two in C, where reading is a dozen lines of Python.
            keys = chunk.count(_USAGE_KEY)
            if keys:
                nulls = chunk.count(_NO_USAGE)
                if nulls != keys and nulls + chunk.count(_NO_USAGE_SPACED) != keys:
                    self._read(chunk)

    def _into_head(self, head: list[bytes], chunk: bytes) -> bool:
        """Whether ``chunk`` goes into the head (it is taken there). A complete head is
        read and let go of first."""
        if head and self._head_size >= self._head_limit:
            self._head = None
            self._read(b"".join(head))
            return False
        if not head and chunk.startswith(_EVENT_STREAM_STARTS):
            self._head_limit = 0
        head.append(chunk)
        self._head_size += len(chunk)
        return True

    def _read(self, data: bytes) -> None:
        """Read the usage objects whose keys are in ``data`` (what is open of the last
        read, then the new bytes): the last complete one's counts are kept; one still
        open at the end of ``data``, or a key cut off there, waits for the next chunk."""
        self._open = None
        key = data.rfind(_USAGE_KEY)
        while key != -1:
            found = _usage_at(data, key + len(_USAGE_KEY))
            if found is _CUT_OFF:
                # The leftmost open one within the bound: later keys may be inside it.
                if len(data) - key <= OPEN_USAGE_BYTES:
                    self._open = data[key:]
            elif found is not None:
                self._found = found
                break
            key = data.rfind(_USAGE_KEY, 0, key)
        if self._open is None and data.endswith(_KEY_STARTS):
            self._open = data[data.rfind(b'"', max(0, len(data) - len(_KEY_STARTS))) :]

    @property
    def kept_bytes(self) -> int:
        """Bytes referenced right now (bounded by about HEAD_BYTES + OPEN_USAGE_BYTES)."""
        held = self._head_size if self._head is not None else 0
        return held + (len(self._open) if self._open is not None else 0)

    def usage(self) -> TokenCounts:
        head = self._head
        if head is not None:  # the whole answer
            return usage_of_answer(b"".join(head))  # the chunk itself when there is one
        return self._found or NO_USAGE


# An encoded answer is decoded as it streams, this many bytes at a time (each is read and
# let go of, so memory stays at about this), and up to DECODED_ANSWER_BYTES in
# all: past that its usage is not read (0 tokens), and a "zip bomb" costs no more than
# decoding that much, once.
DECODE_STEP_BYTES = 256 * 1024
DECODED_ANSWER_BYTES = 16 * 1024 * 1024


class DecodingUsageSniffer:
    """A ``UsageSniffer`` for an answer sent with a ``Content-Encoding`` (gzip, deflate):
    its chunks are decoded as they come, within the bounds above, and the decoded bytes
    read as an unencoded answer's are. An encoding it cannot decode (br, zstd) gives 0
    tokens, as an answer without usage does."""

    __slots__ = ("_decoded", "_decoder", "_raw_deflate", "_sniffer", "failed")

    def __init__(self, coding: str) -> None:
        coding = coding.strip().lower()
        self._sniffer = UsageSniffer()
        self._decoded = 0
        self._raw_deflate = False
        self.failed = False
        self._decoder: zlib._Decompress | None = None
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
            self._raw_deflate = True  # may turn out raw (no zlib header): see feed
        elif coding not in ("", "identity"):
            self.failed = True

    def feed(self, chunk: bytes) -> None:
        if self.failed:
            return
        decoder = self._decoder
        if decoder is None:
            self._sniffer.feed(chunk)
            return
        data = chunk
        while data:
            try:
                decoded = decoder.decompress(data, DECODE_STEP_BYTES)
            except zlib.error:
                if self._raw_deflate and self._decoded == 0:
                    # Some servers send raw deflate for "deflate": start over that way.
                    self._raw_deflate = False
                    self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    self.feed(chunk)
                    return
                self.failed = True
                return
            self._raw_deflate = False
            self._decoded += len(decoded)
            if self._decoded > DECODED_ANSWER_BYTES:
                self.failed = True  # too large to be read for its usage
                return
            if decoded:
                self._sniffer.feed(decoded)
            data = decoder.unconsumed_tail

    def usage(self) -> TokenCounts:
        return NO_USAGE if self.failed else self._sniffer.usage()


def usage_of_encoded(data: bytes, coding: str) -> TokenCounts:
    """``usage_of_answer`` of a whole answer sent with ``Content-Encoding: coding``."""
    sniffer = DecodingUsageSniffer(coding)
    sniffer.feed(data)
    return sniffer.usage()


# Up to this size an answer (a classifier's scores, a short completion) is decoded whole
# by msgspec into its top-level ``usage`` alone: one C call that skips everything else,
# two to three times cheaper than finding and parsing the usage at the end of the text
# (``usage_from_end``). Skipping costs per byte, finding the end does not: past about 800
# bytes of numbers (1,700 of text) the end wins, hence the bound.
SMALL_ANSWER_BYTES = 512


# gc=False: they hold only ints and each other, so they can never be part of a cycle, and
# untracked they are cheaper to make and free (two per traced answer) and do not bring
# the collector's next pass closer.
class _Usage(msgspec.Struct, gc=False):
    # int, as in _counts_of: a bool, a float, a string or null is not a count, and makes
    # the decode fail over to usage_from_end, which reads that count as 0.
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer(msgspec.Struct, gc=False):
    usage: _Usage | None = None  # other members are skipped, not built


_decode_answer = msgspec.json.Decoder(_Answer).decode


def usage_of_answer(data: bytes) -> TokenCounts:
    """Counts from a whole answer: one JSON object (its top-level ``usage``), or anything
    else holding a ``"usage": {...}`` (an event stream)."""
    return usage_of_answers((data,))[0]


def usage_of_answers(answers: Iterable[bytes]) -> list[TokenCounts]:
    """``usage_of_answer`` of each answer. The load trace reads every traced answer this
    way, a batch at a time: one loop instead of a call per answer."""
    counts: list[TokenCounts] = []
    append = counts.append
    for data in answers:
        if len(data) <= SMALL_ANSWER_BYTES:
            try:
                usage = _decode_answer(data).usage
            except msgspec.DecodeError:
                pass  # not one JSON object, or a count of another type: read it as below
            else:
                if usage is None:
                    append(NO_USAGE)
                else:
                    prompt, completion = usage.prompt_tokens, usage.completion_tokens
                    append((prompt if prompt > 0 else 0, completion if completion > 0 else 0))
                continue
        append(usage_from_end(data))
    return counts


def usage_from_end(data: bytes) -> TokenCounts:
    """``usage_of_answer`` for any size, working from the end of the text, where servers
    put ``usage``: when it is there, the work does not grow with the answer. Its steps are
    written out here rather than split into helpers, as it runs for every large traced
    answer."""
    key = data.rfind(_USAGE_KEY)
    if key == -1:
        return NO_USAGE  # the usual answer of a model that is not a language model
    if data[0] != 0x7B:  # "{"
        return find_usage(data) or NO_USAGE
    # Shortcut for OpenAI-style answers, where ``usage`` is the last member: parse that
    # member alone. ``key`` is the last ``"usage"``; a quote after a backslash is inside
    # a string. Otherwise the text from the ``{`` after it up to the document's closing
    # brace is exactly one JSON object only if this ``usage`` sits at the top level and
    # nothing follows it: nested deeper, more closing brackets would follow; followed by
    # other members, a comma would. Anything else gets a full parse.
    usage = None
    after_key = key + len(_USAGE_KEY)
    if data[key - 1] != 0x5C:  # "\\"; key > 0, as data[0] is "{"
        # Compact, as servers write it (`"usage":{...}}` at the very end), is found by
        # indexing: a bytes.find() or a slice costs about half as much as the parse.
        last = len(data) - 1
        if after_key < last and data[after_key] == 0x3A and data[after_key + 1] == 0x7B:
            start = after_key + 1
        else:
            start = data.find(b"{", after_key)
            if start != -1 and data[after_key:start].strip() != b":":
                start = -1
        if start != -1:
            end = last if data[last] == 0x7D else data.rfind(b"}")
            try:  # noqa: SIM105 (a try costs nothing unless it raises; suppress() is a call)
                usage = orjson.loads(data[start:end])
            except orjson.JSONDecodeError:
                pass
    if usage is None:
        try:
            usage = orjson.loads(data).get("usage")
        except orjson.JSONDecodeError:
            return find_usage(data) or NO_USAGE
        if type(usage) is not dict:
            return NO_USAGE
    return _counts_of(usage)


def _counts_of(usage: dict[str, object]) -> TokenCounts:
    # type() is int: not a bool, not a float; negative counts are a broken server's.
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if type(prompt) is int and prompt > 0 else 0,
        completion if type(completion) is int and completion > 0 else 0,
    )


def find_usage(data: bytes) -> TokenCounts | None:
    """Counts from the last ``"usage": {...}`` in ``data``; None if there is none."""
    position = data.rfind(_USAGE_KEY)
    while position != -1:
        found = _usage_at(data, position + len(_USAGE_KEY))
        if found is not None and found is not _CUT_OFF:
            return found
        position = data.rfind(_USAGE_KEY, 0, position)
    return None


def _usage_at(data: bytes, start: int) -> TokenCounts | None:
    """Counts from the value after the ``"usage"`` key that ends at ``start``: None when
    it is not an object of counts (null, say), ``_CUT_OFF`` when ``data`` ends before
    the value does (or starts)."""
    index = start
    length = len(data)
    while index < length and data[index] in b" \t\r\n":
        index += 1
    if index >= length:
        return _CUT_OFF
    if data[index] != 0x3A:  # ":"
        return None
    index += 1
    while index < length and data[index] in b" \t\r\n":
        index += 1
    if index >= length:
        return _CUT_OFF
    if data[index] != 0x7B:  # "{"
        return None  # "usage": null
    end = data.find(b"}", index)
    if end != -1 and data.find(b"{", index + 1, end) == -1:
        # Flat, as servers send it: the object's end is found in C. Should that brace be
        # inside a string, the slice does not parse, and the brace is matched below.
        try:
            usage = orjson.loads(data[index : end + 1])
        except orjson.JSONDecodeError:
            pass
        else:
            return _counts_of(usage) if isinstance(usage, dict) else None
    end = _matching_brace(data, index)  # nested objects: brace by brace, in Python
    if end == -1:
        return _CUT_OFF
    try:
        usage = orjson.loads(data[index : end + 1])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(usage, dict):
        return None
    return _counts_of(usage)


def _matching_brace(data: bytes, start: int) -> int:
    depth = 0
    in_string = False
    index = start
    length = len(data)
    while index < length:
        byte = data[index]
        if in_string:
            if byte == 0x5C:  # backslash: skip the escaped character
                index += 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1
