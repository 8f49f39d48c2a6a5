"""Reading the client's request body, never past ``server.max_body_bytes``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.pipeline.errors import BodyTooLarge


async def limited_stream(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A body as it arrives, cut off past ``limit`` bytes."""
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        yield chunk


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing at once anything past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    return b"".join([chunk async for chunk in limited_stream(request.content, limit)])
