"""Compressed bodies: decoded incrementally and never past a cap (a "zip bomb" costs
nothing), large ones off the event loop; traces count the tokens of encoded answers;
request bodies are relayed as the client encoded them."""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
import zlib
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.core.usage import DecodingUsageSniffer, usage_of_encoded
from gateway.shadow.bodies import decode_body, decode_body_off_loop
from tests.conftest import StartApp, StartGateway
from tests.e2e_support import admin_windows, bucket_pair
from tests.helpers.apps import catch_all_app
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024
BOMB = gzip.compress(b"\0" * (200 * MiB))  # about 200 KB that expand to 200 MB


def test_a_zip_bomb_is_not_expanded() -> None:
    tracemalloc.start()
    try:
        started = time.monotonic()
        assert decode_body(BOMB, "gzip", MiB) is None
        assert usage_of_encoded(BOMB, "gzip") == (0, 0)
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak  # the cap (and a chunk's expansion), not 200 MB
    assert took < 1.0


def test_bodies_within_the_cap_decode_whole() -> None:
    body = orjson.dumps({"predictions": [[0.1, 0.9]] * 1000})
    assert decode_body(gzip.compress(body), "gzip", MiB) == body
    assert decode_body(zlib.compress(body), "deflate", MiB) == body
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_body(raw.compress(body) + raw.flush(), "deflate", MiB) == body
    assert decode_body(body, None, MiB) == body
    assert decode_body(gzip.compress(body), "gzip", len(body) - 1) is None  # past the cap
    assert decode_body(gzip.compress(body)[:-20], "gzip", MiB) is None  # cut off
    assert decode_body(body, "br", MiB) is None  # not read here: not compared wrongly


async def test_large_bodies_decode_off_the_event_loop() -> None:
    """While a large body decodes, the loop keeps running (it ticks meanwhile)."""
    body = orjson.dumps({"x": list(range(400_000))})
    packed = gzip.compress(body, compresslevel=1)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        assert await decode_body_off_loop(packed, "gzip", 64 * MiB) == body
    finally:
        ticker.cancel()
    assert ticks > 1


def test_usage_is_read_from_an_encoded_stream_chunk_by_chunk() -> None:
    events = [b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'] * 2000
    events.append(
        b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 345}}\n\n'
    )
    packed = gzip.compress(b"".join(events))
    sniffer = DecodingUsageSniffer("gzip")
    for start in range(0, len(packed), 100):
        sniffer.feed(packed[start : start + 100])
    assert sniffer.usage() == (12, 345)
    bomb = DecodingUsageSniffer("gzip")
    for start in range(0, len(BOMB), 65536):
        bomb.feed(BOMB[start : start + 65536])
    assert bomb.failed and bomb.usage() == (0, 0)


# --- through a gateway ----------------------------------------------------------------


def usage_answer(prompt: int, completion: int) -> bytes:
    return orjson.dumps(
        {
            "choices": [{"message": {"content": "hi"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        }
    )


async def encoded_llm(request: web.Request) -> web.StreamResponse:
    """Answers gzip-encoded with the usage the path names: /v1/<p>/<c>[/stream]."""
    parts = request.path.strip("/").split("/")
    prompt, completion = int(parts[1]), int(parts[2])
    await request.read()
    if parts[-1] != "stream":
        return web.Response(
            body=gzip.compress(usage_answer(prompt, completion)),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
    await response.prepare(request)
    packed = gzip.compress(b"data: {}\n\n" * 500 + b"data: " + usage_answer(prompt, completion))
    for start in range(0, len(packed), 256):
        await response.write(packed[start : start + 256])
    await response.write_eof()
    return response


async def test_traces_count_the_tokens_of_encoded_answers(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    url = await start_app(catch_all_app(encoded_llm))
    gateway = await start_gateway(
        gateway_document(
            {"llm": {"url": url}},
            [{"name": "chat", "match": {"path_prefix": "/v1"}, "champion": "llm"}],
            tracing={"interval_seconds": 1},
        )
    )
    plan = [(10, 200, ""), (3000, 50, ""), (7, 9, "/stream"), (100, 4000, "/stream")]
    for prompt, completion, suffix in plan:
        async with http.post(proxy_url(gateway, f"/v1/{prompt}/{completion}{suffix}")) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"  # relayed as it came
            await response.read()
    expected = Counter(bucket_pair(p, c) for p, c, _ in plan)

    async def counted() -> bool:
        windows, current = await admin_windows(http, gateway, "llm")
        seen: Counter[str] = Counter()
        for trace in [*windows.values(), current or {}]:
            seen.update({k: v for k, v in trace.items() if not k.startswith("meta_")})
        return seen == expected

    await wait_until(counted, "the encoded answers' tokens in the trace", within=10)


async def test_shadow_compares_encoded_answers_and_drops_a_bomb(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    answer = orjson.dumps({"predictions": [[0.25, 0.75]]})

    async def champion(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=gzip.compress(answer), headers={"Content-Encoding": "gzip"})

    async def shadow(request: web.Request) -> web.Response:
        await request.read()
        if request.path.endswith("bomb"):
            return web.Response(body=BOMB, headers={"Content-Encoding": "gzip"})
        return web.Response(body=answer, content_type="application/json")

    gateway = await start_gateway(
        gateway_document(
            {
                "one": {"url": await start_app(catch_all_app(champion))},
                "two": {"url": await start_app(catch_all_app(shadow))},
            },
            [
                {
                    "name": "r",
                    "match": {"path_prefix": "/"},
                    "champion": "one",
                    "shadow": {"target": "two", "sample_rate": 1.0, "max_body_bytes": 4 * MiB},
                }
            ],
        )
    )
    for path in ("/v1/models/m:predict", "/v1/models/m:bomb"):
        async with http.post(proxy_url(gateway, path), data=b"{}") as response:
            assert response.status == 200
            assert gzip.decompress(await response.read()) == answer

    async def outcomes() -> dict[str, Any] | None:
        async with http.get(admin_url(gateway, "/api/v1/routes/r/shadow")) as response:
            report = await response.json()
        counts: dict[str, Any] = report["outcomes"]
        return counts if sum(counts.values()) == 2 else None

    counts = await wait_until(outcomes, "both shadow calls counted")
    assert counts["match"] == 1  # gzip against plain: the same answer once decoded
    assert counts["dropped"] == 1  # the bomb: past the cap, not compared


async def test_an_encoded_request_body_reaches_the_backend_as_sent(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    received: list[tuple[str | None, bytes]] = []

    async def record(request: web.Request) -> web.Response:
        received.append((request.headers.get("Content-Encoding"), await request.read()))
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    # The upstream must not decode either, to see the bytes as they came.
    runner_url = await start_app(app)
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": runner_url}},
            [{"name": "r", "match": {"path_prefix": "/"}, "champion": "one"}],
        )
    )
    body = gzip.compress(b'{"instances": [1, 2, 3]}')
    async with http.post(
        proxy_url(gateway, "/x"), data=body, headers={"Content-Encoding": "gzip"}
    ) as response:
        assert response.status == 200
    # aiohttp's server decodes on read(): the upstream read gives the decoded bytes of
    # exactly what it was sent, with the coding it was sent with.
    assert received == [("gzip", b'{"instances": [1, 2, 3]}')]
