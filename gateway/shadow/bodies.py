"""Bounded copies of bodies streaming past, and undoing an answer's content coding: what
mirroring keeps of a request and its answer, never more than a set number of bytes."""

from __future__ import annotations

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


def decode_body(body: bytes, content_encoding: str | None) -> bytes | None:
    """The body without its content coding; None when it cannot be decoded here."""
    coding = (content_encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(body, wbits=16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, wbits=-zlib.MAX_WBITS)  # raw deflate
    except zlib.error:
        return None
    return None  # br, zstd, ...: not compared rather than compared wrongly
