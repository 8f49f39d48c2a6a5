"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from aiohttp import web

from gateway.admin.common import TARGET, json_response, settle_shadows


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    return json_response({"status": target.status}, 200 if target.ready else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    settle_shadows(request)
    # The text is made off the event loop (with many routes it takes seconds), and sent
    # in the pieces it was made in.
    pieces = await request.app[TARGET].metrics.render_off_loop()
    response = web.StreamResponse(
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )
    response.content_length = sum(len(piece) for piece in pieces)
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    await response.write_eof()
    return response
