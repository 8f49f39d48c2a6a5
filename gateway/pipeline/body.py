"""Reading the client's request body: never past ``server.max_body_bytes``, never
waiting longer than ``server.body_timeout_seconds`` for its next piece, and, for bodies
held in memory, never past ``server.max_buffered_bytes`` over all requests at once.

The body timeout is kept here, where the body is read, and not by the connection: only
the reader knows whether the gateway is waiting for the client, or the client for the
gateway (a backend that reads slowly holds the client back, through back-pressure,
and that is no fault of the client's).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.core.jsonbody import ModelScan, Scan, body_model
from gateway.pipeline.errors import BodyTimeout, BodyTooLarge, Overloaded


class BufferBudget:
    """The bytes of request bodies held in memory at once, over all requests: past
    ``limit``, a request that needs its body in memory is refused (503 overloaded)
    rather than the process growing without bound."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise Overloaded
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


async def body_chunks(
    content: aiohttp.StreamReader, gap_seconds: float | None, limit: int | None = None
) -> AsyncIterator[bytes]:
    """A body as it arrives: what is buffered at once, then each next piece within
    ``gap_seconds`` (else BodyTimeout; None: no limit); past ``limit`` bytes,
    BodyTooLarge."""
    size = 0
    while True:
        chunk = content.read_nowait(-1)
        if not chunk:
            if content.is_eof():
                return
            try:
                async with asyncio.timeout(gap_seconds):
                    chunk = await content.readany()
            except TimeoutError:
                raise BodyTimeout from None
            if not chunk:
                return
        if limit is not None:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
        yield chunk


@dataclass(slots=True)
class HeldBody:
    """Bytes of a request body read into memory, counted against the budget until
    ``release``; ``complete`` False when only its start was read (the rest streams)."""

    data: bytes
    complete: bool
    budget: BufferBudget | None = None

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(len(self.data))
            self.budget = None


async def read_body(
    request: web.BaseRequest,
    limit: int,
    budget: BufferBudget | None = None,
    gap_seconds: float | None = 60.0,
) -> HeldBody:
    """The whole body, refusing at once anything past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    content = request.content
    if content.is_eof():  # the usual small body, here whole already
        return _held(content.read_nowait(-1), limit, budget)
    chunks = await _taken(body_chunks(content, gap_seconds, limit), budget)
    return HeldBody(b"".join(chunks), True, budget)


async def _taken(source: AsyncIterator[bytes], budget: BufferBudget | None) -> list[bytes]:
    """The chunks of ``source``, each taken from ``budget``; should reading fail, what
    was taken is given back."""
    chunks: list[bytes] = []
    taken = 0
    try:
        async for chunk in source:
            if budget is not None:
                budget.take(len(chunk))
            taken += len(chunk)
            chunks.append(chunk)
    except BaseException:
        if budget is not None:
            budget.give(taken)
        raise
    return chunks


async def read_model(
    request: web.BaseRequest,
    limit: int,
    budget: BufferBudget | None = None,
    gap_seconds: float | None = 60.0,
) -> tuple[HeldBody, str | None]:
    """Enough of the body to know its JSON ``model`` (see ``gateway.core.jsonbody``),
    and that model. A body that arrived whole is parsed whole; one that streams is read
    until its leading members name the model, or whole when they cannot."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    content = request.content
    if content.is_eof():
        held = _held(content.read_nowait(-1), limit, budget)
        return held, body_model(held.data)
    buffer = bytearray()
    scan: ModelScan | None = ModelScan()
    complete = True
    try:
        async for chunk in body_chunks(content, gap_seconds, limit):
            if budget is not None:
                budget.take(len(chunk))
            buffer += chunk
            if scan is not None:
                found = scan.feed(buffer)
                if found is Scan.FOUND and not content.is_eof():
                    complete = False
                    break
                if found is not Scan.MORE:
                    scan = None  # decided: found at the very end, or only the whole body tells
    except BaseException:
        if budget is not None:
            budget.give(len(buffer))
        raise
    held = HeldBody(bytes(buffer), complete, budget)
    if complete:
        return held, body_model(held.data)
    assert scan is not None
    return held, scan.model


async def read_rest(
    request: web.BaseRequest,
    held: HeldBody,
    limit: int,
    gap_seconds: float | None = 60.0,
) -> HeldBody:
    """The whole body, from ``held`` (its start, read by ``read_model``) and the rest;
    ``held``'s bytes are accounted for by the result from then on."""
    budget = held.budget
    rest = limit - len(held.data) if request.content_length is None else None
    chunks = await _taken(body_chunks(request.content, gap_seconds, rest), budget)
    held.budget = None  # the whole body's HeldBody gives it all back
    return HeldBody(b"".join([held.data, *chunks]), True, budget)


def _held(data: bytes, limit: int, budget: BufferBudget | None) -> HeldBody:
    if len(data) > limit:  # a chunked body (a declared length was checked already)
        raise BodyTooLarge
    if budget is not None:
        budget.take(len(data))
    return HeldBody(data, True, budget)


def limited_stream(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A body as it arrives, cut off past ``limit`` bytes (no timeout: see body_chunks)."""
    return body_chunks(content, None, limit)
