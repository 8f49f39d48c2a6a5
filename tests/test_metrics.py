"""``/metrics`` (DESIGN section 4), parsed with prometheus_client's own parser, shows exact
counts after a known sequence of requests through real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app, named_app
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, proxy_url

SLOW_TIMEOUT = 0.3

Labels = tuple[str, ...]


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    """Lets a held upstream answer finish at teardown, so its server stops at once."""
    event = asyncio.Event()
    yield event
    event.set()


def held_app(release: asyncio.Event) -> web.Application:
    """An upstream that sends nothing until released (or 10 s pass)."""

    async def answer(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"backend": "slow"})

    return catch_all_app(answer)


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = tuple(sorted(sample.labels.items()))
                self.samples.setdefault(sample.name, {})[key] = sample.value

    def values(self, name: str, *label_names: str, **fixed: str) -> dict[Labels, float]:
        """Samples of ``name`` whose labels include ``fixed``, keyed by ``label_names``."""
        found: dict[Labels, float] = {}
        for key, value in self.samples.get(name, {}).items():
            labels = dict(key)
            if all(labels.get(k) == v for k, v in fixed.items()):
                picked = tuple(labels[n] for n in label_names)
                assert picked not in found, f"{label_names} do not identify a {name} sample"
                found[picked] = value
        return found

    def nonzero(self, name: str, *label_names: str, **fixed: str) -> dict[Labels, float]:
        return {k: v for k, v in self.values(name, *label_names, **fixed).items() if v != 0}


async def scrape(http: aiohttp.ClientSession, gateway: Gateway) -> Scrape:
    async with http.get(admin_url(gateway, "/metrics")) as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return Scrape(await r.text())


async def scrape_when(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    settled: Callable[[Scrape], object],
    what: str,
    deadline: float = 5.0,
) -> Scrape:
    """Scrape until ``settled(scrape)`` holds: the gateway records an answer right after
    sending its last byte, which the client may see a moment earlier."""

    async def settled_scrape() -> Scrape | None:
        result = await scrape(http, gateway)
        return result if settled(result) else None

    return await wait_until(settled_scrape, what, within=deadline)


async def start_metrics_gateway(
    start_app: StartApp, start_gateway: StartGateway, release: asyncio.Event
) -> Gateway:
    v1 = await start_app(named_app("model-v1"))
    v2 = await start_app(named_app("model-v2"))
    slow = await start_app(held_app(release))
    dead = f"http://127.0.0.1:{free_port()}"
    document = gateway_document(
        {
            "model-v1": {"url": v1},
            "model-v2": {"url": v2},
            "dead": {"url": dead, "connect_timeout_seconds": 2},
            "slow": {"url": slow, "timeout_seconds": SLOW_TIMEOUT},
        },
        [
            {
                "name": "main",
                "match": {"path_prefix": "/v1/models/main"},
                "champion": "model-v1",
                "challenger": "model-v2",
                "split": {"challenger_weight": 0.5, "allow_override": True},
            },
            {"name": "dead", "match": {"path_prefix": "/v1/models/dead"}, "champion": "dead"},
            {"name": "slow", "match": {"path_prefix": "/v1/models/slow"}, "champion": "slow"},
        ],
    )
    return await start_gateway(document)


async def test_exact_counts_after_a_known_sequence(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    release: asyncio.Event,
) -> None:
    gateway = await start_metrics_gateway(start_app, start_gateway, release)

    async def send(path: str, variant: str | None = None) -> tuple[int, str, Any]:
        headers = {"X-Gateway-Variant": variant} if variant else {}
        async with http.post(proxy_url(gateway, path), json={"x": 1}, headers=headers) as r:
            return r.status, r.headers.get("X-Gateway-Variant", ""), await r.json()

    for variant, count, backend in (("champion", 7, "model-v1"), ("challenger", 3, "model-v2")):
        for _ in range(count):
            answer = await send("/v1/models/main:predict", variant)
            assert answer == (200, variant, {"backend": backend})
    for _ in range(2):
        assert (await send("/v2/unknown"))[0] == 404
    assert (await send("/v1/models/dead:predict"))[0] == 502
    started = time.monotonic()
    assert (await send("/v1/models/slow:predict"))[0] == 504
    assert time.monotonic() - started >= SLOW_TIMEOUT
    async with http.put(
        admin_url(gateway, "/api/v1/routes/main/weight"), json={"challenger_weight": 0.25}
    ) as r:
        assert r.status == 200

    def settled(s: Scrape) -> bool:
        total = sum(s.values("gateway_requests_total", "route", "variant", "code").values())
        return total == 14 and not s.nonzero("gateway_requests_in_flight", "route", "variant")

    s = await scrape_when(http, gateway, settled, "all 14 answers counted, none in flight")

    assert s.types["gateway_requests"] == "counter"
    assert s.types["gateway_request_duration_seconds"] == "histogram"
    assert s.types["gateway_requests_in_flight"] == "gauge"
    assert s.types["gateway_upstream_errors"] == "counter"
    assert s.types["gateway_challenger_weight"] == "gauge"

    # Answers given before a route was chosen carry empty route and variant labels.
    assert s.values("gateway_requests_total", "route", "variant", "code") == {
        ("main", "champion", "200"): 7,
        ("main", "challenger", "200"): 3,
        ("", "", "404"): 2,
        ("dead", "champion", "502"): 1,
        ("slow", "champion", "504"): 1,
    }
    durations = {
        ("main", "champion"): 7,
        ("main", "challenger"): 3,
        ("", ""): 2,
        ("dead", "champion"): 1,
        ("slow", "champion"): 1,
    }
    assert s.nonzero("gateway_request_duration_seconds_count", "route", "variant") == durations
    assert (
        s.nonzero("gateway_request_duration_seconds_bucket", "route", "variant", le="+Inf")
        == durations
    )
    slow_seconds = s.values("gateway_request_duration_seconds_sum", "route", variant="champion")
    assert SLOW_TIMEOUT <= slow_seconds[("slow",)] < SLOW_TIMEOUT + 2
    in_flight = s.values("gateway_requests_in_flight", "route", "variant")
    assert in_flight, "no in-flight gauge at all"
    assert set(in_flight.values()) == {0}
    assert s.values("gateway_upstream_errors_total", "route", "variant", "reason") == {
        ("dead", "champion", "connect"): 1,
        ("slow", "champion", "timeout"): 1,
    }
    assert s.values("gateway_challenger_weight", "route") == {
        ("main",): 0.25,
        ("dead",): 0.0,
        ("slow",): 0.0,
    }


async def test_in_flight_counts_a_held_request(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    release: asyncio.Event,
) -> None:
    """The gauge is 1 while an answer is pending and 0 once it is given."""
    slow = await start_app(held_app(release))
    document = gateway_document(
        {"slow": {"url": slow, "timeout_seconds": 10}},
        [{"name": "slow", "match": {"path_prefix": "/"}, "champion": "slow"}],
    )
    gateway = await start_gateway(document)

    async def call() -> int:
        async with http.get(proxy_url(gateway, "/x")) as r:
            await r.read()
            return r.status

    pending = asyncio.create_task(call())
    try:
        s = await scrape_when(
            http,
            gateway,
            lambda s: s.nonzero("gateway_requests_in_flight", "route", "variant"),
            "a request in flight",
        )
        assert s.nonzero("gateway_requests_in_flight", "route", "variant") == {
            ("slow", "champion"): 1
        }
        assert not s.values("gateway_requests_total", "route", "variant", "code")
        release.set()
        assert await asyncio.wait_for(pending, 5) == 200
    finally:
        release.set()
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    s = await scrape_when(
        http,
        gateway,
        lambda s: not s.nonzero("gateway_requests_in_flight", "route", "variant"),
        "no request in flight",
    )
    assert not s.nonzero("gateway_requests_in_flight", "route", "variant")
    assert s.values("gateway_requests_total", "route", "variant", "code") == {
        ("slow", "champion", "200"): 1
    }
