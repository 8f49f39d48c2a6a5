"""Bounded copies of bodies streaming past, and undoing an answer's content coding: what
mirroring keeps of a request and its answer, never more than a set number of bytes."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator


class BoundedCopy:
    """A copy of a stream's bytes, abandoned once it would exceed ``limit``."""

    __slots__ = ("_chunks", "_size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def feed(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self.overflowed = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)

    def value(self) -> bytes | None:
        return None if self.overflowed else b"".join(self._chunks)


async def tee_stream(source: AsyncIterator[bytes], copy: BoundedCopy) -> AsyncIterator[bytes]:
    """Pass ``source`` through unchanged while keeping a bounded copy."""
    async for chunk in source:
        copy.feed(chunk)
        yield chunk


# A compressed body up to this size is decoded on the event loop (what it decodes to is
# capped anyway); a larger one in a worker thread, so that it does not hold the loop.
DECODE_INLINE_BYTES = 16 * 1024


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """The body without its content coding; None when it cannot be decoded here, or
    would decode to more than ``limit`` bytes (decoding stops there: a small "zip bomb"
    never expands in memory)."""
    coding = (content_encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body if len(body) <= limit else None
    if coding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, limit)
    if coding == "deflate":
        # RFC 9110 says zlib-wrapped; some servers send raw deflate.
        decoded = _inflate(body, zlib.MAX_WBITS, limit)
        return decoded if decoded is not None else _inflate(body, -zlib.MAX_WBITS, limit)
    return None  # br, zstd, ...: not compared rather than compared wrongly


def _inflate(body: bytes, wbits: int, limit: int) -> bytes | None:
    decoder = zlib.decompressobj(wbits)
    try:
        decoded = decoder.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(decoded) > limit or not decoder.eof:
        return None  # past the limit, or cut off
    return decoded


async def decode_body_off_loop(
    body: bytes, content_encoding: str | None, limit: int
) -> bytes | None:
    """``decode_body``, in a worker thread when the body is large."""
    if content_encoding is None or len(body) <= DECODE_INLINE_BYTES:
        return decode_body(body, content_encoding, limit)
    return await asyncio.to_thread(decode_body, body, content_encoding, limit)
