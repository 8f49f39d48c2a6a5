"""The request pipeline through real sockets, against real loopback upstream servers."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.core.split import Variant, bucket_of, choose, threshold
from tests.conftest import StartApp, StartGateway
from tests.helpers.ports import free_port
from tests.support import gateway_document, proxy_url

MiB = 1024 * 1024


def echo_app(name: str) -> web.Application:
    """Answers with its own name and what it received."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "path_qs": request.path_qs,
                "headers": {k: v for k, v in request.headers.items()},
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        )

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def single_backend(url: str, prefix: str = "/", **backend: Any) -> dict[str, Any]:
    return gateway_document(
        {"one": {"url": url, **backend}},
        [{"name": "only", "match": {"path_prefix": prefix}, "champion": "one"}],
    )


def two_backends(champion: str, challenger: str, **extra: Any) -> dict[str, Any]:
    return {
        "one": {"url": champion, **extra},
        "two": {"url": challenger, **extra},
    }


def route(weight: float = 0.0, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "r",
        "match": {"path_prefix": "/"},
        "champion": "one",
        "challenger": "two",
        "split": {"challenger_weight": weight},
    }
    spec.update(overrides)
    return spec


async def _json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with session.post(url, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_same_request_id_always_lands_on_the_same_backend(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = await start_app(echo_app("one")), await start_app(echo_app("two"))
    gateway = await start_gateway(gateway_document(two_backends(one, two), [route(0.5)]))
    seen: dict[str, set[str]] = {}
    for i in range(60):
        request_id = f"sticky-{i % 20}"
        status, body, headers = await _json(
            http, proxy_url(gateway, "/predict"), headers={"X-Request-ID": request_id}
        )
        assert status == 200
        seen.setdefault(request_id, set()).add(body["backend"])
        expected = choose(bucket_of(request_id), threshold(0.5))
        assert headers["X-Gateway-Variant"] == expected.value
        assert body["backend"] == ("two" if expected is Variant.CHALLENGER else "one")
    assert all(len(backends) == 1 for backends in seen.values())
    assert {b for backends in seen.values() for b in backends} == {"one", "two"}


async def test_split_key_from_header_cookie_and_query(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = await start_app(echo_app("one")), await start_app(echo_app("two"))

    def keyed(name: str, key: str, salt: str = "") -> dict[str, Any]:
        split = {"challenger_weight": 0.5, "key": key, "salt": salt}
        return route(name=name, match={"path_prefix": f"/{name}"}, split=split)

    routes = [keyed("h", "header:X-User"), keyed("c", "cookie:uid", "s1"), keyed("q", "query:user")]
    gateway = await start_gateway(gateway_document(two_backends(one, two), routes))
    for user in (f"user-{i}" for i in range(12)):
        variant = choose(bucket_of(user), threshold(0.5)).value
        salted = choose(bucket_of(user, "s1"), threshold(0.5)).value
        for request_id in ("x1", "x2"):  # the request ID must not matter
            base = {"X-Request-ID": request_id}
            _, _, h = await _json(http, proxy_url(gateway, "/h"), headers={**base, "X-User": user})
            assert h["X-Gateway-Variant"] == variant
            _, _, h = await _json(
                http, proxy_url(gateway, "/c"), headers={**base, "Cookie": f"uid={user}"}
            )
            assert h["X-Gateway-Variant"] == salted
            _, _, h = await _json(http, proxy_url(gateway, f"/q?user={user}&x=1"), headers=base)
            assert h["X-Gateway-Variant"] == variant


async def test_override_header_is_honoured_only_when_allowed(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = await start_app(echo_app("one")), await start_app(echo_app("two"))
    routes = [
        route(0.0, name="strict", match={"path_prefix": "/strict"}),
        route(0.0, name="open", match={"path_prefix": "/open"},
              split={"challenger_weight": 0.0, "allow_override": True}),
    ]  # fmt: skip
    gateway = await start_gateway(gateway_document(two_backends(one, two), routes))
    force = {"X-Gateway-Variant": "challenger"}
    _, body, _ = await _json(http, proxy_url(gateway, "/strict"), headers=force)
    assert body["backend"] == "one"
    _, body, headers = await _json(http, proxy_url(gateway, "/open"), headers=force)
    assert body["backend"] == "two"
    assert headers["X-Gateway-Variant"] == "challenger"


async def test_request_id_is_generated_forwarded_and_echoed(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = await start_app(echo_app("one")), await start_app(echo_app("two"))
    gateway = await start_gateway(gateway_document(two_backends(one, two), [route()]))
    _, body, headers = await _json(http, proxy_url(gateway, "/x"))
    generated = headers["X-Request-ID"]
    assert len(generated) >= 16
    assert body["headers"]["X-Request-ID"] == generated
    _, body, headers = await _json(http, proxy_url(gateway, "/x"), headers={"X-Request-ID": "mine"})
    assert headers["X-Request-ID"] == "mine"
    assert body["headers"]["X-Request-ID"] == "mine"


async def test_longest_prefix_and_body_model_match(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    a, b, c = [await start_app(echo_app(n)) for n in "abc"]
    backends = {"a": {"url": a}, "b": {"url": b}, "c": {"url": c}}
    routes = [
        {"name": "root", "match": {"path_prefix": "/"}, "champion": "a"},
        {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "champion": "b"},
        {"name": "llama", "match": {"path_prefix": "/v1/chat", "model": "llama"}, "champion": "c"},
    ]
    gateway = await start_gateway(gateway_document(backends, routes))
    cases = [
        ("/v1/models/x:predict", b"{}", "a"),
        ("/v1/chat/completions", b'{"model": "gpt"}', "b"),
        ("/v1/chat/completions", b'{"model": "llama", "messages": []}', "c"),
        ("/v1/chat/completions", b"not json", "b"),
    ]
    for path, payload, expected in cases:
        status, body, _ = await _json(http, proxy_url(gateway, path), data=payload)
        assert status == 200
        assert body["backend"] == expected, path
        # The body read for matching is forwarded unchanged.
        assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_header_match(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    a, b = await start_app(echo_app("a")), await start_app(echo_app("b"))
    backends = {"a": {"url": a}, "b": {"url": b}}
    routes = [
        {"name": "plain", "match": {"path_prefix": "/"}, "champion": "a"},
        {"name": "beta", "match": {"path_prefix": "/", "header": {"name": "X-Beta", "value": "1"}},
         "champion": "b"},
    ]  # fmt: skip
    gateway = await start_gateway(gateway_document(backends, routes))
    _, body, _ = await _json(http, proxy_url(gateway, "/p"), headers={"X-Beta": "1"})
    assert body["backend"] == "b"
    _, body, _ = await _json(http, proxy_url(gateway, "/p"), headers={"X-Beta": "0"})
    assert body["backend"] == "a"


async def test_server_sent_events_reach_the_client_one_by_one(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(5):
            await response.write(f"data: event-{i}\n\n".encode())
            await asyncio.sleep(0.2)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", events)
    upstream = await start_app(app)
    gateway = await start_gateway(single_backend(upstream))
    started = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    async with http.get(proxy_url(gateway, "/stream")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                arrivals.append((time.monotonic() - started, event))
    assert [e for _, e in arrivals] == [f"data: event-{i}".encode() for i in range(5)]
    first, last = arrivals[0][0], arrivals[-1][0]
    # The upstream needs >= 0.8 s to send all five; the first must not wait for the rest.
    assert last >= 0.75
    assert first < last - 0.5
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.1 for gap in gaps), gaps


async def test_one_mib_bodies_arrive_byte_identical_both_ways(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    payload = os.urandom(MiB)
    answer = os.urandom(MiB)

    async def mirror(request: web.Request) -> web.Response:
        received = await request.read()
        return web.Response(
            body=answer,
            headers={"X-Received-Sha256": hashlib.sha256(received).hexdigest(),
                     "X-Received-Length": str(len(received))},
        )  # fmt: skip

    app = web.Application(client_max_size=4 * MiB)
    app.router.add_post("/big", mirror)
    upstream = await start_app(app)
    gateway = await start_gateway(single_backend(upstream))

    async with http.post(proxy_url(gateway, "/big"), data=payload) as response:
        assert response.status == 200
        assert response.headers["X-Received-Length"] == str(MiB)
        assert response.headers["X-Received-Sha256"] == hashlib.sha256(payload).hexdigest()
        assert await response.read() == answer

    async def chunks() -> AsyncIterator[bytes]:  # a chunked (no Content-Length) upload
        for i in range(0, MiB, 64 * 1024):
            yield payload[i : i + 64 * 1024]

    async with http.post(proxy_url(gateway, "/big"), data=chunks()) as response:
        assert response.status == 200
        assert response.headers["X-Received-Sha256"] == hashlib.sha256(payload).hexdigest()
        assert await response.read() == answer


async def test_hop_by_hop_headers_are_not_forwarded_either_way(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    seen: dict[str, str] = {}

    async def handle(request: web.Request) -> web.Response:
        seen.update(request.headers)
        response = web.Response(text="ok")
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic"
        response.headers["X-Resp-Hop"] = "secret"
        response.headers["Connection"] = "X-Resp-Hop"
        response.headers["X-End-To-End"] = "kept"
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    upstream = await start_app(app)
    gateway = await start_gateway(single_backend(upstream))
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "X-End-To-End": "kept",
        "X-Forwarded-For": "10.1.2.3",
    }
    async with http.get(proxy_url(gateway, "/h"), headers=headers) as response:
        assert response.status == 200
        got = response.headers
        for name in ("Keep-Alive", "Proxy-Authenticate", "X-Resp-Hop"):
            assert name not in got, name
        assert got["X-End-To-End"] == "kept"
    lowered = {k.lower(): v for k, v in seen.items()}
    for name in ("x-secret-hop", "keep-alive", "proxy-authorization", "te", "proxy-connection"):
        assert name not in lowered, name
    assert lowered["x-end-to-end"] == "kept"
    assert lowered["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert lowered["x-forwarded-proto"] == "http"
    assert lowered["x-forwarded-host"] == f"127.0.0.1:{gateway.proxy_port}"


async def _expect_error(
    http: aiohttp.ClientSession, url: str, status: int, code: str, **kwargs: Any
) -> dict[str, Any]:
    kwargs.setdefault("headers", {"X-Request-ID": f"err-{code}"})
    async with http.post(url, **kwargs) as response:
        assert response.status == status
        assert response.headers["Content-Type"].startswith("application/json")
        body: dict[str, Any] = orjson.loads(await response.read())
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == kwargs["headers"]["X-Request-ID"]
    assert response.headers["X-Request-ID"] == kwargs["headers"]["X-Request-ID"]
    return body


async def test_dead_upstream_gives_502(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = await start_gateway(single_backend(dead))
    await _expect_error(http, proxy_url(gateway, "/x"), 502, "upstream_unavailable")


async def test_slow_upstream_gives_504_at_the_configured_timeout(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_post("/slow", slow)
    upstream = await start_app(app)
    gateway = await start_gateway(single_backend(upstream, timeout_seconds=0.5))
    started = time.monotonic()
    await _expect_error(http, proxy_url(gateway, "/slow"), 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    release.set()
    assert 0.45 <= elapsed < 2.0


async def test_unknown_path_gives_404(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one = await start_app(echo_app("one"))
    gateway = await start_gateway(single_backend(one, prefix="/v1"))
    await _expect_error(http, proxy_url(gateway, "/v2/nothing"), 404, "no_route")


async def test_oversized_body_gives_413(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one = await start_app(echo_app("one"))
    routes = [
        {"name": "plain", "match": {"path_prefix": "/plain"}, "champion": "one"},
        {"name": "model", "match": {"path_prefix": "/model", "model": "m"}, "champion": "one"},
    ]
    gateway = await start_gateway(
        gateway_document({"one": {"url": one}}, routes, server={"max_body_bytes": 1000})
    )
    big = b"x" * 5000

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 1000

    await _expect_error(http, proxy_url(gateway, "/plain"), 413, "body_too_large", data=big)
    await _expect_error(http, proxy_url(gateway, "/model"), 413, "body_too_large", data=big)
    await _expect_error(http, proxy_url(gateway, "/model"), 413, "body_too_large", data=chunked())
    await _expect_error(http, proxy_url(gateway, "/plain"), 413, "body_too_large", data=chunked())
    # At the limit is fine.
    status, body, _ = await _json(http, proxy_url(gateway, "/plain"), data=b"z" * 1000)
    assert status == 200
    assert body["body_length"] == 1000


@pytest.mark.timeout(10)  # without a 100 Continue the client waits forever
async def test_expect_100_continue_is_answered_at_once(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one = await start_app(echo_app("one"))
    gateway = await start_gateway(single_backend(one))
    payload = os.urandom(200_000)
    started = time.monotonic()
    async with http.post(proxy_url(gateway, "/up"), data=payload, expect100=True) as response:
        body = await response.json()
    assert response.status == 200
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert "expect" not in {k.lower() for k in body["headers"]}
    assert time.monotonic() - started < 0.9  # curl would have waited 1 s without it


async def test_upstream_gets_exactly_the_client_headers_plus_forwarding_ones(
    start_app: StartApp, start_gateway: StartGateway
) -> None:
    seen: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.extend(
            request.raw_headers and [(k.decode(), v.decode()) for k, v in request.raw_headers]
        )
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    gateway = await start_gateway(single_backend(await start_app(app)))
    # A raw request, so no client library adds headers of its own.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: gw\r\nX-Custom: 1\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    names = {name.lower() for name, _ in seen}
    # No Accept, Accept-Encoding, User-Agent or Content-Type invented on the way.
    assert names == {
        "host", "x-custom", "content-length", "x-request-id",
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    }  # fmt: skip
    assert dict(seen)["X-Forwarded-Host"] == "gw"


async def test_backend_breaking_mid_answer_cuts_the_client_connection(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gateway = await start_gateway(single_backend(f"http://127.0.0.1:{port}"))
        async with http.get(proxy_url(gateway, "/x")) as response:
            assert response.status == 200
            # The client must see a broken answer, not a clean short one.
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        async with http.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as response:
            text = await response.text()
        labels = 'reason="stream_reset",route="only",variant="champion"'
        assert f"gateway_upstream_errors_total{{{labels}}} 1.0" in text
    finally:
        server.close()
        await server.wait_closed()
