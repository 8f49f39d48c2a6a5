"""The baseline: a minimal aiohttp pass-through proxy.

What anyone would write in a few lines, done the fast way aiohttp allows: uvloop, the
low-level ``web.Server`` (no router, no middlewares, no access log), one pooled
``ClientSession``, hop-by-hop headers dropped, bodies streamed both ways. Nothing else:
no request IDs, no metrics, no error mapping. The gateway is asked to beat *this*, so it
must not be a straw man.

``python -m bench.baseline_proxy --port 8080 --upstream http://127.0.0.1:8001``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# RFC 9110 7.6.1, plus Host: the client session sets the upstream's own.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _DROP
    connection = headers.get("Connection")
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class BaselineProxy:
    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream.rstrip("/")
        self.session = session

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        async with self.session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=forwarded_headers(request.headers),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forwarded_headers(upstream.headers),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


async def serve(host: str, port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        # No pool cap: requests must not queue behind an arbitrary connection limit.
        connector=aiohttp.TCPConnector(limit=0),
        # A pass-through proxy forwards bytes as they are.
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=30),
    )
    proxy = BaselineProxy(upstream, session)
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="minimal aiohttp pass-through proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    args = parser.parse_args(argv)
    from bench.loop import run

    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
