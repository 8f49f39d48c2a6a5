"""Helpers for the shadow-traffic tests: recording model servers, /metrics parsing,
waiting for the gateway to settle, the exact binomial interval, and process measurements."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from tests.helpers.apps import catch_all_app
from tests.helpers.waiting import wait_until
from tests.support import admin_url

SHADOW_HEADER = "X-Gateway-Shadow"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as a backend received it."""

    method: str
    path: str
    request_id: str | None
    shadow: str | None  # the X-Gateway-Shadow header, None when absent
    user: str | None
    body_sha256: str


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    def add(self, request: web.Request, body: bytes) -> None:
        self.seen.append(
            Seen(
                method=request.method,
                path=request.path,
                request_id=request.headers.get("X-Request-ID"),
                shadow=request.headers.get(SHADOW_HEADER),
                user=request.headers.get("X-User"),
                body_sha256=hashlib.sha256(body).hexdigest(),
            )
        )

    @property
    def shadow_calls(self) -> list[Seen]:
        return [s for s in self.seen if s.shadow is not None]

    @property
    def direct_calls(self) -> list[Seen]:
        return [s for s in self.seen if s.shadow is None]


def scores_for(body: bytes) -> list[float]:
    """Deterministic class scores derived from the request body."""
    digest = hashlib.sha256(body).digest()
    return [round(b / 255, 4) for b in digest[:4]]


def tfserving_app(recorder: Recorder, shift: float = 0.0) -> web.Application:
    """A TF Serving-style model: ``{"predictions": [[scores]]}``, scores shifted by ``shift``."""

    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        recorder.add(request, body)
        scores = [round(s + shift, 4) for s in scores_for(body or request.path.encode())]
        return web.json_response({"predictions": [scores]})

    return catch_all_app(predict)


def status_app(recorder: Recorder, status: int) -> web.Application:
    async def fail(request: web.Request) -> web.Response:
        recorder.add(request, await request.read())
        return web.json_response({"error": "model crashed"}, status=status)

    return catch_all_app(fail)


@dataclass
class BlackHole:
    """A server that reads the request and never answers, until ``release`` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0
    waiting: int = 0

    def app(self) -> web.Application:
        async def hang(request: web.Request) -> web.Response:
            await request.read()
            self.received += 1
            self.waiting += 1
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1
            return web.json_response({"late": True})

        return catch_all_app(hang)


def noisy_app(recorder: Recorder, score_shift: float = 0.0) -> web.Application:
    """A deterministic model wrapped in an envelope whose ``id`` and ``created`` change
    on every call, like most real model servers. ``created`` is an ISO timestamp: as a
    number (epoch seconds or even nanoseconds) it would stay within the default relative
    tolerance of 1e-5 between two calls and never differ at all."""

    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        recorder.add(request, body)
        scores = scores_for(body)
        return web.json_response(
            {
                "id": uuid.uuid4().hex,
                "created": datetime.now(UTC).isoformat(timespec="microseconds"),
                "object": "prediction",
                "output": {
                    "label": f"class-{scores.index(max(scores))}",
                    "score": round(max(scores) + score_shift, 4),
                },
            }
        )

    return catch_all_app(predict)


def openai_chunk(content: str | None = None, *, role: bool = False, finish: bool = False) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "tiny-llm",
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if finish else None}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def openai_stream_app(
    recorder: Recorder,
    pieces: list[str],
    gates: dict[str, asyncio.Event] | None = None,
) -> web.Application:
    """An OpenAI-compatible chat server streaming ``pieces`` as SSE deltas. When ``gates``
    holds an event for the request ID, the rest of the stream waits for it after the
    first piece, so a test can see that piece arrive on its own."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorder.add(request, body)
        gate = (gates or {}).get(request.headers.get("X-Request-ID", ""))
        if request.headers.get(SHADOW_HEADER) is not None:
            gate = None  # only the client-facing answer is held
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(openai_chunk(role=True))
        for i, piece in enumerate(pieces):
            await response.write(openai_chunk(piece))
            if i == 0 and gate is not None:
                await asyncio.wait_for(gate.wait(), 5)
        await response.write(openai_chunk(finish=True))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


# --------------------------------------------------------------------------- gateway views


class Scrape:
    """One /metrics answer parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (have, value)
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.matching(name, **labels))

    def outcomes(self, route: str) -> dict[str, int]:
        return {
            labels["outcome"]: int(value)
            for labels, value in self.matching("gateway_shadow_requests_total", route=route)
        }


async def scrape(http: aiohttp.ClientSession, gateway: Gateway) -> Scrape:
    async with http.get(admin_url(gateway, "/metrics"), timeout=CLIENT_TIMEOUT) as response:
        assert response.status == 200
        return Scrape(await response.text())


async def shadow_report(http: aiohttp.ClientSession, gateway: Gateway, route: str) -> Any:
    url = admin_url(gateway, f"/api/v1/routes/{route}/shadow")
    async with http.get(url, timeout=CLIENT_TIMEOUT) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def requests_in_flight(gateway: Gateway) -> float:
    return sum(
        sample.value for family in gateway.metrics.in_flight.collect() for sample in family.samples
    )


async def settle(gateway: Gateway, deadline: float = 5.0) -> None:
    """Every request handler has finished (so every sample was submitted or dropped),
    every shadow call has ended and its answer was compared. The client may see its last
    byte before the gateway hands the sample over, so this is polled, not assumed."""
    runner = gateway.shadow_runner
    assert runner is not None
    await wait_until(
        lambda: requests_in_flight(gateway) == 0
        and runner.tasks_in_flight == 0
        and runner.pending_comparisons == 0,
        "requests and shadow calls to finish",
        within=deadline,
    )


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    request_id: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    sent = {"X-Request-ID": request_id, **(headers or {})}
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    started = time.perf_counter()
    async with http.request(
        method, url, data=body, headers=sent, timeout=CLIENT_TIMEOUT
    ) as response:
        data = await response.read()
        seconds = time.perf_counter() - started
        return Reply(response.status, data, dict(response.headers), seconds)


async def run_clients(clients: int, jobs: list[Callable[[], Awaitable[Reply]]]) -> list[Reply]:
    """Run ``jobs`` on ``clients`` concurrent workers; replies in job order."""
    replies: list[Reply | None] = [None] * len(jobs)
    queue = iter(enumerate(jobs))

    async def worker() -> None:
        for index, job in queue:
            replies[index] = await job()

    await asyncio.gather(*(worker() for _ in range(clients)))
    assert all(r is not None for r in replies)
    return [r for r in replies if r is not None]


# --------------------------------------------------------------------------- figures


def binomial_interval(n: int, p: Fraction, coverage: Fraction) -> tuple[int, int]:
    """The central interval [lo, hi] of Binomial(n, p), exact in rational arithmetic: each
    tail outside it holds at most (1 - coverage) / 2 of the probability."""
    tail = (1 - coverage) / 2
    pmf = [(1 - p) ** n]
    for k in range(n):
        pmf.append(pmf[-1] * (n - k) / (k + 1) * p / (1 - p))
    below = Fraction(0)
    lo = 0
    while below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    above = Fraction(0)
    hi = n
    while above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile: an observed latency, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q)) - 1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
