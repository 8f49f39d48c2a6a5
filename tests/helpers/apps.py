"""Small upstream apps for the loopback servers the tests start (see the ``start_app``
fixture): one handler for every method and path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def catch_all_app(handler: Handler, **options: Any) -> web.Application:
    """An app that hands every request, whatever its method and path, to ``handler``.
    ``options`` go to ``web.Application`` (``client_max_size`` for large bodies)."""
    app = web.Application(**options)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def named_app(name: str) -> web.Application:
    """An upstream that answers every request with ``{"backend": name}``."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"backend": name})

    return catch_all_app(answer)


def hung_app(started: asyncio.Event) -> web.Application:
    """An upstream that never answers; ``started`` is set once a request is in."""

    async def never(request: web.Request) -> web.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return catch_all_app(never)
