"""Helpers for the end-to-end trace and state tests: an OpenAI-style model server that
answers with the ``usage`` the request asks for (plain JSON or SSE), trace readers for
Redis and the admin API, /metrics parsing, and a persistent private redis-server that
keeps its data across a stop and start."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as config_module
from gateway.app import Gateway
from gateway.core.trace import serialize, token_bucket
from tests.redis_fixtures import RedisServer
from tests.support import admin_url

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
CHAT_PATH = "/v1/chat/completions"
META = ("meta_interval_sec", "meta_pending_reqs", "meta_precision", "meta_total_reqs", "meta_v")
_FIELD = rb'"(\d+:\d+|meta_[a-z_]+)":\d+'
COMPACT_SORTED = re.compile(rb"^\{" + _FIELD + rb"(," + _FIELD + rb")*\}$")


# --------------------------------------------------------------------------- model server


def bucket_pair(prompt_tokens: int, completion_tokens: int) -> str:
    """The "<in>:<out>" key a request with this usage is counted under."""
    return f"{token_bucket(prompt_tokens)}:{token_bucket(completion_tokens)}"


def expected_buckets(usages: Iterable[tuple[int, int] | None]) -> Counter[str]:
    return Counter(bucket_pair(*(u or (0, 0))) for u in usages)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


class UsageServer:
    """An OpenAI-compatible chat server. The request body says what to answer:
    ``{"usage": [prompt, completion] | null, "stream": bool, "hold": "<name>"}``.

    ``hold`` makes the answer wait until ``release(name)``; ``held`` tells when it arrived.
    Requests carrying ``X-Gateway-Shadow`` are counted in ``shadow_calls``.
    """

    def __init__(self, fixed_usage: tuple[int, int] | None = None) -> None:
        # When set, every answer carries this usage whatever the request asked for (a
        # shadow target answering the champion's requests with its own counts).
        self.fixed_usage = fixed_usage
        self.calls = 0
        self.shadow_calls = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._arrived: dict[str, asyncio.Event] = {}

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    def arrived(self, name: str) -> asyncio.Event:
        return self._arrived.setdefault(name, asyncio.Event())

    def release(self, name: str) -> None:
        self._gate(name).set()

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CHAT_PATH, self._chat)
        app.router.add_route("*", "/{tail:.*}", self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read() or b"{}")
        self.calls += 1
        if request.headers.get("X-Gateway-Shadow") is not None:
            self.shadow_calls += 1
        hold = body.get("hold")
        if hold:
            self.arrived(hold).set()
            await self._gate(hold).wait()
        usage = self.fixed_usage or body.get("usage")
        usage_obj = (
            None
            if usage is None
            else {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "total_tokens": usage[0] + usage[1],
            }
        )
        ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if not body.get("stream"):
            answer: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello there"},
                        "finish_reason": "stop",
                    }
                ],
            }
            if usage_obj is not None:
                answer["usage"] = usage_obj
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", "m"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,  # what servers send with stream_options.include_usage
            }

        # "pieces": that many more content chunks (a long answer, token by token).
        extra = [chunk({"content": f" token{i}"}) for i in range(int(body.get("pieces", 0)))]
        for piece in (
            chunk({"role": "assistant"}),
            chunk({"content": "hello"}),
            *extra,
            chunk({"content": " there"}),
            chunk({}, "stop"),
        ):
            await response.write(_sse(piece))
        if usage_obj is not None:  # the usage chunk comes last, with no choices
            last = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", "m"),
                "choices": [],
                "usage": usage_obj,
            }
            await response.write(_sse(last))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


async def chat(
    session: aiohttp.ClientSession,
    base: str,
    usage: tuple[int, int] | None,
    *,
    stream: bool = False,
    hold: str | None = None,
    path: str = CHAT_PATH,
    headers: dict[str, str] | None = None,
    pieces: int = 0,
) -> tuple[int, bytes]:
    body: dict[str, Any] = {"model": "m", "stream": stream, "usage": usage}
    if pieces:
        body["pieces"] = pieces
    if hold:
        body["hold"] = hold
    async with session.post(
        base + path, data=orjson.dumps(body), headers=headers, timeout=CLIENT_TIMEOUT
    ) as response:
        return response.status, await response.read()


def answered_usage(raw: bytes, stream: bool) -> tuple[int, int] | None:
    """The usage the client itself received (to check the upstream did what we asked)."""
    if not stream:
        usage = orjson.loads(raw).get("usage")
    else:
        usage = None
        for line in raw.split(b"\n"):
            if line.startswith(b"data: {"):
                usage = orjson.loads(line[6:]).get("usage") or usage
    return None if usage is None else (usage["prompt_tokens"], usage["completion_tokens"])


# --------------------------------------------------------------------------- traces


async def redis_traces(
    client: aioredis.Redis, key_prefix: str, model: str
) -> dict[int, tuple[bytes, int]]:
    """The model's window keys in Redis: window end -> (raw value, PTTL in ms)."""
    pattern = f"{key_prefix}:{model}_request_trace_*"
    keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
    out: dict[int, tuple[bytes, int]] = {}
    for key in keys:
        text = key.decode() if isinstance(key, bytes) else key
        raw = await client.get(key)
        ttl = await client.pttl(key)
        if raw is not None:
            out[int(text.rsplit("_", 1)[1])] = (raw, ttl)
    return out


def decode_traces(raw: dict[int, tuple[bytes, int]]) -> dict[int, dict[str, int]]:
    return {end: orjson.loads(value) for end, (value, _) in raw.items()}


def bucket_totals(traces: Iterable[dict[str, int]]) -> Counter[str]:
    """Sum of the "<in>:<out>" counts over windows."""
    total: Counter[str] = Counter()
    for trace in traces:
        total.update({k: v for k, v in trace.items() if not k.startswith("meta_")})
    return total


def meta_sum(traces: Iterable[dict[str, int]], field: str = "meta_total_reqs") -> int:
    return sum(trace.get(field, 0) for trace in traces)


def assert_wire_format(raw: bytes, interval: int) -> dict[str, int]:
    """Compact JSON, keys sorted, integer values, the five meta fields at their values."""
    assert COMPACT_SORTED.match(raw), raw
    trace = orjson.loads(raw)
    assert raw == serialize(trace), raw  # sorted keys, no spaces
    assert list(trace) == sorted(trace), raw
    for field in META:
        assert field in trace, (field, raw)
    assert trace["meta_v"] == 3
    assert trace["meta_precision"] == 10
    assert trace["meta_interval_sec"] == interval
    assert trace["meta_total_reqs"] >= 0 and trace["meta_pending_reqs"] >= 0
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in trace.values())
    assert all(v > 0 for k, v in trace.items() if not k.startswith("meta_")), raw
    return trace


async def admin_json(
    session: aiohttp.ClientSession, gateway: Gateway | str, path: str
) -> tuple[int, Any]:
    base = gateway if isinstance(gateway, str) else admin_url(gateway)
    async with session.get(base + path, timeout=CLIENT_TIMEOUT) as response:
        return response.status, await response.json()


async def admin_windows(
    session: aiohttp.ClientSession, gateway: Gateway | str, model: str
) -> tuple[dict[int, dict[str, int]], dict[str, Any] | None]:
    """The gateway's own view of a model's closed windows, and its open window."""
    status, view = await admin_json(session, gateway, f"/api/v1/traces/{model}")
    if status == 404:
        return {}, None
    assert status == 200, view
    return {w["window_end"]: w["trace"] for w in view["windows"]}, view["current"]


async def metric_samples(
    session: aiohttp.ClientSession, gateway: Gateway | str, name: str
) -> dict[tuple[tuple[str, str], ...], float]:
    base = gateway if isinstance(gateway, str) else admin_url(gateway)
    async with session.get(base + "/metrics", timeout=CLIENT_TIMEOUT) as response:
        text = await response.text()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def trace_writes(session: aiohttp.ClientSession, gateway: Gateway | str) -> dict[str, float]:
    samples = await metric_samples(session, gateway, "gateway_trace_writes_total")
    return {dict(labels)["outcome"]: value for labels, value in samples.items()}


# --------------------------------------------------------------------------- gateways


@asynccontextmanager
async def running_gateway(document: dict[str, Any]) -> AsyncIterator[Gateway]:
    """A gateway the test stops itself (to restart it), stopped on the way out anyway."""
    gateway = Gateway(config_module.parse(document, environ={}))
    await gateway.start()
    try:
        yield gateway
    finally:
        if gateway.status != "stopped":
            await gateway.stop()


# --------------------------------------------------------------------------- redis


class PersistentRedisServer(RedisServer):
    """A private redis-server with an append-only file in its own directory, so data
    written before a stop is there again after a start on the same port (a real Redis
    restart), while nothing lands in the working directory."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gwtest-redis-"))

    def persistence(self) -> list[str]:
        return ["--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.dir)]  # fmt: skip

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
