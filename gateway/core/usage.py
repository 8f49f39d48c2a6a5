"""Token counts from an answer's OpenAI-style ``usage``.

The proxy never buffers an answer to read it. An answer that arrived whole is read with
``usage_of_answer`` (by the load trace, a batch at a time); a streamed one is handed
chunk by chunk to a ``UsageSniffer``, which keeps references to the first and last few
kilobytes only, and at the end the last ``"usage"`` object in what was kept gives the
counts. That covers a plain JSON answer
(``usage`` is a top-level field, usually last) and a streamed SSE answer (the final
``data:`` event carries ``usage``; earlier ones may carry ``"usage": null``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import msgspec
import orjson

HEAD_BYTES = 8 * 1024
TAIL_BYTES = 2 * 1024
# The tail grows this far past TAIL_BYTES before it is cut back (a cut is a copy).
TAIL_SLACK_BYTES = 512
_USAGE_KEY = b'"usage"'

# How an event stream (server-sent events) starts: with one of its fields, or a comment.
_EVENT_STREAM_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")

# (prompt_tokens, completion_tokens). A plain tuple: it is made for every traced answer,
# and a NamedTuple's constructor is a Python-level call that costs more than the parse.
TokenCounts = tuple[int, int]

NO_USAGE: TokenCounts = (0, 0)


class UsageSniffer:
    """The head of a byte stream (its first HEAD_BYTES, as references to its chunks) and
    its tail (at least its last TAIL_BYTES, a copy), for the usage they hold.

    Most answers arrive in one chunk: that one is only referenced. Once the head is
    complete it is read at once, and let go of unless a ``usage`` object is open at its
    end: an event stream (thousands of them open at a time) then keeps only its tail, a
    few kilobytes, not head and tail. What the head held is kept as its counts, and its
    last bytes move to the tail, so that a ``"usage"`` key across the boundary is still
    found whole there; a ``usage`` object open at the head's end is taken into the head
    whole.

    An event stream's head is its first chunk alone: its usage comes in its last events,
    not its first, and a head of HEAD_BYTES kept by each of thousands of streams until
    it fills up was most of what a stream cost in memory (the pages stay the process's
    once the heads are let go)."""

    __slots__ = ("_dropped", "_head", "_head_counts", "_head_limit", "_head_size", "_tail")

    def __init__(self) -> None:
        self._head: list[bytes] | None = []  # None once read and let go
        self._head_size = 0
        self._head_limit = HEAD_BYTES
        self._head_counts: TokenCounts | None = None  # what the head held, then
        # A copy, cut back to TAIL_BYTES once it is TAIL_SLACK_BYTES past it: three lines
        # of Python per chunk (a list of the chunks, each dropped in turn, was fifteen,
        # for every chunk of thousands of streams).
        self._tail = bytearray()
        self._dropped = False  # bytes were dropped from the tail's front

    def feed(self, chunk: bytes) -> None:
        head = self._head
        tail = self._tail
        if head is not None and not tail and self._into_head(head, chunk):
            return
        tail += chunk
        if len(tail) > TAIL_BYTES + TAIL_SLACK_BYTES:
            del tail[:-TAIL_BYTES]
            self._dropped = True

    def _into_head(self, head: list[bytes], chunk: bytes) -> bool:
        """Whether ``chunk`` goes into the head (it is taken there). A complete head is
        read first, and let go of unless a usage object is open at its end, which it
        then takes in whole (up to twice its size; after that, the tail takes it)."""
        if head and self._head_size >= self._head_limit:
            data = b"".join(head)
            if not _open_usage(data):
                self._let_go_of_head(data)
                return False
            if self._head_size >= 2 * HEAD_BYTES:
                return False
        elif not head and chunk.startswith(_EVENT_STREAM_STARTS):
            self._head_limit = 0
        head.append(chunk)
        self._head_size += len(chunk)
        return True

    def _let_go_of_head(self, data: bytes) -> None:
        self._head_counts = find_usage(data)
        self._head = None
        # The head's last bytes start the tail (a key cut in two is found there).
        self._tail += data[-_OVERLAP_BYTES:]

    @property
    def kept_bytes(self) -> int:
        """Bytes referenced right now (bounded by about HEAD_BYTES + TAIL_BYTES)."""
        return (self._head_size if self._head is not None else 0) + len(self._tail)

    def usage(self) -> TokenCounts:
        head = self._head
        if head is None:
            return find_usage(bytes(self._tail)) or self._head_counts or NO_USAGE
        joined = b"".join(head)  # the chunk itself when there is one
        if not self._tail:
            return usage_of_answer(joined)
        tail = bytes(self._tail)
        if not self._dropped:
            # head + tail is the whole answer: a usage object split between them counts.
            return find_usage(joined + tail) or NO_USAGE
        return find_usage(tail) or find_usage(joined) or NO_USAGE


# An encoded answer is decoded as it streams, this many bytes at a time (only the head
# and tail are kept, so memory stays at about this), and up to DECODED_ANSWER_BYTES in
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


# Bytes of a let-go head that start the tail: more than a "usage" key with its spacing.
_OVERLAP_BYTES = 64


def _open_usage(data: bytes) -> bool:
    """Whether ``data`` ends inside a ``"usage": {...}`` object (its last such key's)."""
    position = data.rfind(_USAGE_KEY)
    if position == -1:
        return False
    index = position + len(_USAGE_KEY)
    length = len(data)
    while index < length and data[index] in b" \t\r\n:":
        index += 1
    if index >= length:
        return True  # the key at the very end: its value follows in the tail
    return data[index] == 0x7B and _matching_brace(data, index) == -1


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
        if found is not None:
            return found
        position = data.rfind(_USAGE_KEY, 0, position)
    return None


def _usage_at(data: bytes, start: int) -> TokenCounts | None:
    index = start
    length = len(data)
    while index < length and data[index] in b" \t\r\n":
        index += 1
    if index >= length or data[index] != ord(":"):
        return None
    index += 1
    while index < length and data[index] in b" \t\r\n":
        index += 1
    if index >= length or data[index] != ord("{"):
        return None  # "usage": null, or cut off
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
        return None
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
