"""Request traces end to end: real clients through the real proxy to real loopback model
servers that answer with known OpenAI ``usage`` (plain JSON and SSE), traces read back
from real redis-servers, the admin API and AIBrix's own reader. No mocks.

Windows are 1 s here. Nothing assumes which window a request lands in: counts are summed
over the model's windows and compared with what the clients sent, and every window in
Redis is compared byte for byte with the gateway's own view of it (the admin API).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from gateway.app import Gateway
from gateway.core.trace import merge, serialize, trace_key, window_end
from tests.aibrix.fixtures import aibrix_model, forget_writer, load_reader  # noqa: F401  (fixtures)
from tests.conftest import StartApp, StartGateway
from tests.e2e_support import (
    CHAT_PATH,
    PersistentRedisServer,
    UsageServer,
    admin_json,
    admin_windows,
    answered_usage,
    assert_wire_format,
    bucket_pair,
    bucket_totals,
    chat,
    decode_traces,
    expected_buckets,
    meta_sum,
    redis_traces,
    trace_writes,
)
from tests.helpers.clock import FakeClock
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import (  # noqa: F401  (fixtures)
    SHARED_REDIS_URL,
    RedisServer,
    fast_client,
    private_redis,
    redis_prefix,
    running,
    shared_redis,
)
from tests.support import gateway_document, log_text, proxy_url, wait_ready

pytestmark = pytest.mark.timeout(30)

INTERVAL = 1
TTL = 30
# What each model server's test traffic looks like: (usage or None, streamed?).
MIXED_PLAN: list[tuple[tuple[int, int] | None, bool]] = (
    [((100, 20), False)] * 5
    + [((1000, 300), True)] * 4
    + [(None, False)] * 2  # an answer without usage counts as 0:0
    + [(None, True)]  # a stream that never sends usage, too
    + [((1, 1), False)]
    + [((3, 2**20), True)]
)


@pytest.fixture
async def usage_server(start_app: StartApp) -> AsyncIterator[tuple[UsageServer, str]]:
    server = UsageServer()
    url = await start_app(server.app())
    yield server, url
    server.release_all()


def traced_document(
    backends: dict[str, Any],
    *,
    key_prefix: str,
    redis_url: str | None,
    routes: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    champion = next(iter(backends))
    tracing: dict[str, Any] = {
        "interval_seconds": INTERVAL,
        "key_prefix": key_prefix,
        "ttl_seconds": TTL,
    }
    if redis_url is not None:
        tracing["redis_url"] = redis_url
    tracing.update(sections.pop("tracing", {}))
    return gateway_document(
        backends,
        routes or [{"name": "chat", "match": {"path_prefix": "/v1"}, "champion": champion}],
        tracing=tracing,
        **sections,
    )


StartLLM = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_llm(usage_server: tuple[UsageServer, str], start_gateway: StartGateway) -> StartLLM:
    """Start a gateway whose one backend, "llm", is ``usage_server``, traced under the
    given model name (None: under its own name); the rest as ``traced_document`` takes."""

    async def start(model: str | None, **document: Any) -> Gateway:
        backend = {"url": usage_server[1], **({"model": model} if model else {})}
        return await start_gateway(traced_document({"llm": backend}, **document))

    return start


async def send_plan(
    http: aiohttp.ClientSession, base: str, plan: list[tuple[tuple[int, int] | None, bool]]
) -> None:
    results = await asyncio.gather(*(chat(http, base, u, stream=s) for u, s in plan))
    for (usage, stream), (status, raw) in zip(plan, results, strict=True):
        assert status == 200, raw
        assert answered_usage(raw, stream) == usage  # the answers really carried it


async def wait_written(
    client: aioredis.Redis,
    key_prefix: str,
    model: str,
    total: int,
    finished: int,
    *,
    within: float = 6.0,
) -> dict[int, tuple[bytes, int]]:
    """Poll until the model's windows in Redis add up to ``total`` arrivals and
    ``finished`` counted answers (the last window is written just after its end)."""

    async def check() -> dict[int, tuple[bytes, int]] | None:
        raw = await redis_traces(client, key_prefix, model)
        traces = decode_traces(raw).values()
        done = sum(bucket_totals(traces).values())
        return raw if meta_sum(traces) == total and done == finished else None

    return await wait_until(check, f"{model}: {total} requests in Redis", within=within)


async def assert_redis_matches_gateway_view(
    http: aiohttp.ClientSession, gateway: Any, model: str, raw: dict[int, tuple[bytes, int]]
) -> None:
    """Every window in Redis is byte for byte the window the gateway closed (one writer)."""
    view, current = await admin_windows(http, gateway, model)
    assert current is None  # nothing left unwritten
    assert sorted(raw) == sorted(view)
    for end, (value, _) in raw.items():
        assert value == serialize(view[end]), (end, value, view[end])


async def test_long_streams_count_the_final_chunks_usage(
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
    shared_redis: aioredis.Redis,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    """Streams of hundreds of chunks, each with ``"usage": null``, far longer than what
    the usage sniffer keeps (its head is let go, its tail is 2 KB): each is counted by
    its final chunk's usage, as the client received it (issue 25)."""
    gateway = await start_llm("foo", key_prefix=redis_prefix, redis_url=SHARED_REDIS_URL)
    plan = [(1000, 600), (17, 2**16), (3, 1), (250_000, 4)]
    results = await asyncio.gather(
        *(chat(http, proxy_url(gateway), u, stream=True, pieces=600) for u in plan)
    )
    for usage, (status, raw) in zip(plan, results, strict=True):
        assert status == 200
        assert len(raw) > 100_000  # 600 chunks of about 180 bytes
        assert answered_usage(raw, True) == usage
    raw_traces = await wait_written(shared_redis, redis_prefix, "foo", len(plan), len(plan))
    traces = [assert_wire_format(value, INTERVAL) for value, _ in raw_traces.values()]
    assert bucket_totals(traces) == expected_buckets(plan)
    assert len(expected_buckets(plan)) == len(plan)  # four distinct buckets: no mix-up


# ---------------------------------------------------------------- acceptance 2 (issue 3)


async def test_proxied_usage_lands_in_redis_windows_exactly(
    usage_server: tuple[UsageServer, str],
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    shared_redis: aioredis.Redis,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    server, upstream = usage_server
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connect refused
    gateway = await start_gateway(traced_document(
        {"llm": {"url": upstream, "model": "foo"}, "dead": {"url": dead}},
        key_prefix=redis_prefix, redis_url=SHARED_REDIS_URL,
        routes=[{"name": "chat", "match": {"path_prefix": "/v1"}, "champion": "llm"},
                {"name": "down", "match": {"path_prefix": "/dead"}, "champion": "dead"}],
    ))  # fmt: skip
    await send_plan(http, proxy_url(gateway), MIXED_PLAN)
    for _ in range(3):
        status, _ = await chat(http, proxy_url(gateway), (5000, 5000), path="/dead" + CHAT_PATH)
        assert status == 502

    n = len(MIXED_PLAN)
    await wait_written(shared_redis, redis_prefix, "foo", n, n)
    read_at = time.time()
    raw = await redis_traces(shared_redis, redis_prefix, "foo")
    traces = {end: assert_wire_format(value, INTERVAL) for end, (value, _) in raw.items()}
    assert bucket_totals(traces.values()) == expected_buckets(u for u, _ in MIXED_PLAN)
    assert bucket_totals(traces.values()) == Counter(
        {"66:43": 5, "100:82": 4, "0:0": 4, "16:200": 1}
    )
    assert meta_sum(traces.values()) == n
    for end, (_, pttl) in raw.items():
        assert 0 < pttl <= TTL * 1000, (end, pttl)  # a TTL counted from the window's end
        # Counted from the window's end (give or take the write's own round trip: Redis
        # starts the PX when the script runs, the writer computes it just before).
        assert pttl <= (end + TTL - read_at) * 1000 + 50, (end, pttl, read_at)
    await assert_redis_matches_gateway_view(http, gateway, "foo", raw)
    # The backend's own name is not a trace model: its `model` field is.
    assert await redis_traces(shared_redis, redis_prefix, "llm") == {}
    assert server.calls == n

    # The dead upstream's requests arrived (meta_total_reqs) but added no tokens.
    dead_raw = await wait_written(shared_redis, redis_prefix, "dead", 3, 0)
    dead_traces = [assert_wire_format(value, INTERVAL) for value, _ in dead_raw.values()]
    assert bucket_totals(dead_traces) == Counter()
    await assert_redis_matches_gateway_view(http, gateway, "dead", dead_raw)


async def test_request_open_at_a_boundary_is_pending_there_and_counted_after(
    usage_server: tuple[UsageServer, str],
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
    shared_redis: aioredis.Redis,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    server, _ = usage_server
    gateway = await start_llm("foo", key_prefix=redis_prefix, redis_url=SHARED_REDIS_URL)
    call = asyncio.create_task(chat(http, proxy_url(gateway), (50, 60), stream=True, hold="slow"))
    try:
        await asyncio.wait_for(server.arrived("slow").wait(), 5)
        # Its arrival window closes while it is still in flight: pending 1, no tokens.
        first = await wait_written(shared_redis, redis_prefix, "foo", 1, 0)
        assert next(iter(first.values()))[0] == serialize({
            "meta_interval_sec": 1, "meta_pending_reqs": 1, "meta_precision": 10,
            "meta_total_reqs": 1, "meta_v": 3,
        })  # fmt: skip
    finally:
        server.release("slow")
    status, raw = await asyncio.wait_for(call, 5)
    assert status == 200 and answered_usage(raw, True) == (50, 60)
    # Its tokens land in the window open when it finished, and nowhere else.
    both = await wait_written(shared_redis, redis_prefix, "foo", 1, 1)
    (arrival,) = first
    later = {end: orjson.loads(value) for end, (value, _) in both.items() if end != arrival}
    assert len(later) == 1 and min(later) > arrival
    assert next(iter(later.values())) == {
        bucket_pair(50, 60): 1, "meta_interval_sec": 1, "meta_pending_reqs": 0,
        "meta_precision": 10, "meta_total_reqs": 0, "meta_v": 3,
    }  # fmt: skip
    await assert_redis_matches_gateway_view(http, gateway, "foo", both)


async def test_proxied_requests_are_timed_on_the_writers_clock(
    usage_server: tuple[UsageServer, str], start_llm: StartLLM, http: aiohttp.ClientSession
) -> None:
    """The proxy times a request as its own perf_counter() readings plus the writer's
    perf_offset: arrival and end land in the windows of the writer's clock, wherever that
    clock is, and a stepped clock is followed once the offset is refreshed."""
    server, _ = usage_server
    gateway = await start_llm("foo", key_prefix="clock", redis_url=None)
    tracer = gateway.tracer
    assert tracer is not None
    await tracer.stop(flush_open=False)  # no background cycle: this test moves the clock
    t0 = 2_000_000_000  # far from the real time; windows of 1 s
    clock = FakeClock(t0 + 0.5)
    tracer.clock = clock

    def step(seconds: float) -> None:
        clock.advance(seconds)
        tracer.refresh_perf_offset()  # what each background cycle does

    step(0)
    await send_plan(http, proxy_url(gateway), [((100, 20), False)])
    step(5)  # the first thing after the step is an arrival: it closes the window
    await send_plan(http, proxy_url(gateway), [((100, 20), False)])
    held = asyncio.create_task(chat(http, proxy_url(gateway), (50, 60), stream=True, hold="h"))
    await asyncio.wait_for(server.arrived("h").wait(), 5)
    step(5)  # now the first thing is an end: it closes the window
    server.release("h")
    status, _ = await asyncio.wait_for(held, 5)
    assert status == 200
    current = tracer.current("foo")
    assert current is not None and current["window_end"] == t0 + 11
    assert current["trace"][bucket_pair(50, 60)] == 1
    assert current["trace"]["meta_total_reqs"] == 0
    await tracer.flush()  # collect the closed windows, as the background cycle would
    closed = {w["window_end"]: w["trace"] for w in tracer.recent("foo")}
    assert sorted(closed) == [t0 + 1, t0 + 6]
    assert closed[t0 + 1]["meta_total_reqs"] == 1
    assert closed[t0 + 6]["meta_total_reqs"] == 2 and closed[t0 + 6]["meta_pending_reqs"] == 1


# ---------------------------------------------------------------- AIBrix's reader


def reader_counts(records: list[Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for record in records:
        key = f"{round(record.input_tokens * 10)}:{round(record.output_tokens * 10)}"
        counts[key] += record.freq
    return counts


async def test_aibrix_gateway_load_reader_reads_proxied_traffic(
    load_reader: types.ModuleType,  # noqa: F811
    aibrix_model: str,  # noqa: F811
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
    shared_redis: aioredis.Redis,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await start_llm(aibrix_model, key_prefix="aibrix", redis_url=SHARED_REDIS_URL)
    assert gateway.tracer is not None
    sync = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        await send_plan(http, proxy_url(gateway), MIXED_PLAN)
        n = len(MIXED_PLAN)
        raw = await wait_written(shared_redis, "aibrix", aibrix_model, n, n)
        traces = decode_traces(raw)
        reader = load_reader.GatewayLoadReader(sync, aibrix_model)
        with caplog.at_level(logging.WARNING):
            # First read: every window the gateway wrote for the model.
            records, rate = reader.read(time.time())
            assert reader_counts(records) == expected_buckets(u for u, _ in MIXED_PLAN)
            assert {r.ts for r in records} == {
                end for end, t in traces.items() if bucket_totals([t])
            }
            assert reader.key_ts_alignment == INTERVAL  # from meta_interval_sec
            assert rate == traces[max(traces)]["meta_total_reqs"] / INTERVAL

            # Then window by window, as the GPU optimizer polls just after each boundary.
            second_plan: list[tuple[tuple[int, int] | None, bool]] = [((64, 128), True)] * 3 + [
                ((7, 9), False)
            ] * 2
            await send_plan(http, proxy_url(gateway), second_plan)
            m = len(second_plan)
            raw2 = await wait_written(shared_redis, "aibrix", aibrix_model, n + m, n + m)
            new = {e: t for e, t in decode_traces(raw2).items() if e not in traces}
            assert new and min(new) > max(traces)
            seen: list[Any] = []
            for end in sorted(new):
                got, rate = reader.read(end + 0.3)
                seen.extend(got)
                assert rate == new[end]["meta_total_reqs"] / INTERVAL
                assert {r.ts for r in got} <= {end}
            assert reader_counts(seen) == expected_buckets(u for u, _ in second_plan)
            assert reader.read(max(new) + 0.6) == ([], 0.0)  # already seen
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        sync.close()
        forget_writer(gateway.tracer.writer_id)


# ---------------------------------------------------------------- acceptance 4


async def test_two_gateway_processes_on_one_redis_add_up(
    usage_server: tuple[UsageServer, str],
    http: aiohttp.ClientSession,
    shared_redis: aioredis.Redis,  # noqa: F811
    redis_prefix: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    _, upstream = usage_server
    gateways: list[tuple[str, str]] = []
    processes: list[Any] = []
    logs: list[Path] = []
    try:
        for name in ("a", "b"):
            port, admin_port = free_port(), free_port()
            document = traced_document(
                {"llm": {"url": upstream, "model": "m"}}, key_prefix=redis_prefix,
                redis_url=SHARED_REDIS_URL, server={"port": port}, admin={"port": admin_port},
                state={"path": str(tmp_path / f"{name}.db")},
            )  # fmt: skip
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump(document))
            log = tmp_path / f"{name}.log"
            logs.append(log)
            with log.open("wb") as out:
                processes.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway.cli", "run", "-c", str(config),
                    stdout=out, stderr=out,
                ))  # fmt: skip
            gateways.append((f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"))
        for (_, admin), process, log in zip(gateways, processes, logs, strict=True):
            await wait_ready(http, admin, process=process, log=log, within=10)

        # Both serve at once for ~2.5 windows: A answers (100, 20), B twice as many (1000, 300).
        (proxy_a, admin_a), (proxy_b, admin_b) = gateways
        sent: Counter[str] = Counter()
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            results = await asyncio.gather(
                chat(http, proxy_a, (100, 20)),
                chat(http, proxy_b, (1000, 300), stream=True),
                chat(http, proxy_b, (1000, 300)),
            )
            assert [status for status, _ in results] == [200, 200, 200]
            sent.update(["a", "b", "b"])
        total = sent["a"] + sent["b"]
        raw = await wait_written(shared_redis, redis_prefix, "m", total, total)

        traces = {end: assert_wire_format(value, INTERVAL) for end, (value, _) in raw.items()}
        assert bucket_totals(traces.values()) == Counter(
            {bucket_pair(100, 20): sent["a"], bucket_pair(1000, 300): sent["b"]}
        )
        # Each window in Redis is exactly the sum of what the two processes closed.
        view_a, current_a = await admin_windows(http, admin_a, "m")
        view_b, current_b = await admin_windows(http, admin_b, "m")
        assert current_a is None and current_b is None
        assert set(traces) == set(view_a) | set(view_b)
        shared = set(view_a) & set(view_b)
        assert len(shared) >= 2, (sorted(view_a), sorted(view_b))
        for end, trace in traces.items():
            parts = [v[end] for v in (view_a, view_b) if end in v]
            expected = parts[0] if len(parts) == 1 else merge(parts[0], parts[1])
            assert trace == expected, (end, trace, parts)
        assert meta_sum(view_a.values()) == sent["a"] and meta_sum(view_b.values()) == sent["b"]
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process, log in zip(processes, logs, strict=False):
            try:
                code = await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise AssertionError(f"gateway did not stop:\n{log_text(log)}") from None
            assert code == 0, log_text(log)
            assert "Traceback" not in log_text(log), log_text(log)


# ---------------------------------------------------------------- acceptance 5


@pytest.fixture
def persistent_redis() -> Iterator[PersistentRedisServer]:
    with running(PersistentRedisServer()) as server:
        yield server


async def test_redis_outage_under_load_loses_no_request_and_no_window(
    persistent_redis: PersistentRedisServer,
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
) -> None:
    url = persistent_redis.url
    gateway = await start_llm(
        "m", key_prefix="aibrix", redis_url=None, tracing={"ttl_seconds": 60},
        state={"backend": "redis", "redis_url": url, "key_prefix": "gw"},
    )  # fmt: skip
    client = fast_client(url)
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set() and len(results) < 50_000:  # bounded either way
            sent = time.time()
            try:
                status, _ = await chat(http, proxy_url(gateway), (100, 20))
            except (aiohttp.ClientError, TimeoutError):
                status = -1
            results.append((sent, time.time(), status))

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    try:
        await wait_until(lambda: _ok_writes(http, gateway, 1), "a first write", within=4)
        ok_before = (await trace_writes(http, gateway))["ok"]
        await asyncio.to_thread(persistent_redis.stop)
        down_at = time.time()
        await wait_until(lambda: _errors(http, gateway), "a failed write", within=4)
        # Load goes on through at least three whole windows with Redis gone.
        back_at = math.ceil(down_at) + 3 + 0.1
        await asyncio.sleep(max(0.0, back_at - time.time()))
        await asyncio.to_thread(persistent_redis.start)
        up_at = time.time()
        await wait_until(
            lambda: _ok_writes(http, gateway, ok_before + 1), "writes succeeding again", within=4
        )
        # A little more load after the restart: answers to requests sent after it.
        await wait_until(
            lambda: sum(sent > up_at for sent, _, _ in results) >= 20,
            "20 requests answered after the restart",
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)

    try:
        assert results and all(status == 200 for _, _, status in results), Counter(
            s for _, _, s in results
        )
        n = len(results)
        raw = await wait_written(client, "aibrix", "m", n, n, within=8)
        traces = {end: assert_wire_format(value, INTERVAL) for end, (value, _) in raw.items()}
        assert meta_sum(traces.values()) == n
        assert bucket_totals(traces.values()) == Counter({bucket_pair(100, 20): n})
        # Every window is the one the gateway closed, outage or not.
        await assert_redis_matches_gateway_view(http, gateway, "m", raw)
        # Every second that surely saw a request has its window, with arrivals in it.
        surely = {math.floor(s) + 1 for s, a, _ in results if math.floor(s) == math.floor(a)}
        missing = sorted(surely - {e for e, t in traces.items() if t["meta_total_reqs"] > 0})
        assert not missing, missing
        outage = [e for e in traces if down_at + 1 <= e <= up_at]  # windows wholly in it
        assert len(outage) >= 3, (down_at, up_at, sorted(traces))
        for end in outage:
            lower = sum(1 for s, a, _ in results if window_end(s, 1) == end == window_end(a, 1))
            upper = sum(1 for s, a, _ in results if s < end and a >= end - 1)
            assert lower <= traces[end]["meta_total_reqs"] <= upper, (end, traces[end])
            # Written late with what was left of its TTL, not a fresh one.
            assert raw[end][1] <= (end + 60 - up_at) * 1000 + 50, (end, raw[end][1])
        writes = await trace_writes(http, gateway)
        assert writes["error"] >= 1 and writes["ok"] >= ok_before + len(outage)
        print(
            f"\n[outage] {n} requests, 0 failed; Redis down {up_at - down_at:.1f}s; "
            f"{len(traces)} windows ({len(outage)} inside the outage) all in Redis; "
            f"trace writes {writes}"
        )
    finally:
        await client.aclose()


async def _ok_writes(http: aiohttp.ClientSession, gateway: Any, at_least: float) -> bool:
    return (await trace_writes(http, gateway)).get("ok", 0) >= at_least


async def _errors(http: aiohttp.ClientSession, gateway: Any) -> bool:
    return (await trace_writes(http, gateway)).get("error", 0) >= 1


# ---------------------------------------------------------------- acceptance 6

OUR_STATS_COMMANDS = ("config|resetstat", "info", "hello", "client|setinfo")
MERGE_COMMANDS = 4  # per written window: EVALSHA, and inside it SET NX (marker), GET, SET


async def _load(
    http: aiohttp.ClientSession, base: str, n: int, concurrency: int = 25, spread: float = 0.0
) -> None:
    """``n`` requests from ``concurrency`` clients, paced evenly over ``spread`` seconds."""
    queue = iter(range(n))
    failures: list[int] = []
    started = time.monotonic()

    async def worker() -> None:
        for i in queue:
            delay = started + spread * i / n - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            status, _ = await chat(http, base, (100, 20), stream=bool(i % 2))
            if status != 200:
                failures.append(status)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert not failures, failures


async def _flushed(http: aiohttp.ClientSession, gateway: Any, model: str) -> bool:
    _, current = await admin_windows(http, gateway, model)
    return current is None and gateway.tracer.backlog_size == 0


def _server_commands(server: RedisServer) -> dict[str, int]:
    stats = server.command_stats()
    for ours in OUR_STATS_COMMANDS:
        stats.pop(ours, None)
    return stats


async def _measured_run(
    server: RedisServer, http: aiohttp.ClientSession, gateway: Any, n: int
) -> tuple[dict[str, int], int, float]:
    """Commands Redis processed while the gateway served ``n`` requests and wrote their
    windows: (per-command counts, windows written, elapsed seconds)."""
    ok0 = (await trace_writes(http, gateway))["ok"]
    server.reset_stats()
    started = time.monotonic()
    # Spread over a few windows, so the per-window cost shows as such.
    await _load(http, proxy_url(gateway), n, spread=2.5)
    await wait_until(lambda: _flushed(http, gateway, "m"), "windows written", within=5)
    stats = _server_commands(server)
    elapsed = time.monotonic() - started
    windows = int((await trace_writes(http, gateway))["ok"] - ok0)
    return stats, windows, elapsed


async def _warm_up(http: aiohttp.ClientSession, gateway: Any) -> None:
    """Connections, handshakes and SCRIPT LOAD happen once, before counting."""
    await _load(http, proxy_url(gateway), 3, 3)
    await wait_until(lambda: _ok_writes(http, gateway, 1), "a first write", within=4)
    await wait_until(lambda: _flushed(http, gateway, "m"), "windows written", within=4)


async def test_redis_commands_per_proxied_request(
    private_redis: RedisServer,  # noqa: F811
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_llm("m", key_prefix="aibrix", redis_url=private_redis.url)
    await _warm_up(http, gateway)
    n = 1000
    stats, windows, elapsed = await _measured_run(private_redis, http, gateway, n)
    total = sum(stats.values())
    assert 3 <= windows <= math.ceil(elapsed) + 1
    assert stats == {"evalsha": windows, "set": 2 * windows, "get": windows}, stats
    beyond = (total - MERGE_COMMANDS * windows) / n
    assert beyond <= 0.01
    print(
        f"\n[redis cost, embedded state] {n} requests in {elapsed:.2f}s, {windows} windows: "
        f"{total} commands ({stats}) = {total / n:.4f}/request, "
        f"{total / windows:.1f}/window (1 round trip: EVALSHA), "
        f"{beyond:.4f}/request beyond the per-window cost"
    )


async def test_redis_commands_per_request_with_the_redis_state_store(
    private_redis: RedisServer,  # noqa: F811
    start_llm: StartLLM,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start_llm(
        "m", key_prefix="aibrix", redis_url=None,
        state={"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"},
    )  # fmt: skip
    await _warm_up(http, gateway)

    # Idle: only the store's revision watcher talks to Redis, at a fixed rate.
    private_redis.reset_stats()
    idle_started = time.monotonic()
    await asyncio.sleep(2.0)  # a measurement period, not a wait for anything
    idle = _server_commands(private_redis)
    idle_seconds = time.monotonic() - idle_started
    assert set(idle) <= {"get"}, idle
    polls_per_second = idle.get("get", 0) / idle_seconds
    assert 2 <= polls_per_second <= 5, idle  # one GET of the revision every 250 ms

    n = 1000
    stats, windows, elapsed = await _measured_run(private_redis, http, gateway, n)
    assert set(stats) <= {"evalsha", "set", "get"}, stats
    assert stats["evalsha"] == windows and stats["set"] == 2 * windows, stats
    polls = stats["get"] - windows  # the rest of the GETs read the revision
    assert polls <= elapsed / 0.25 + 2, (polls, elapsed)
    total = sum(stats.values())
    beyond = (total - polls - MERGE_COMMANDS * windows) / n
    assert beyond <= 0.01
    print(
        f"\n[redis cost, redis state] idle: {polls_per_second:.2f} commands/s "
        f"(revision poll); {n} requests in {elapsed:.2f}s, {windows} windows: "
        f"{total} commands ({stats}) = {polls} polls ({polls / elapsed:.2f}/s) + "
        f"{MERGE_COMMANDS * windows} trace ({MERGE_COMMANDS}/window) + "
        f"{beyond * n:.0f} per-request ({beyond:.4f}/request)"
    )


# ---------------------------------------------------------------- shadow load (issue 4)


async def _all_traced(
    http: aiohttp.ClientSession, gateway: Any, model: str
) -> tuple[int, Counter[str]]:
    windows, current = await admin_windows(http, gateway, model)
    traces = [*windows.values(), *([current["trace"]] if current else [])]
    return meta_sum(traces), bucket_totals(traces)


async def test_shadow_calls_are_load_on_their_target(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    champion, challenger = UsageServer(), UsageServer(fixed_usage=(40, 7))
    champion_url = await start_app(champion.app())
    challenger_url = await start_app(challenger.app())
    gateway = await start_gateway(traced_document(
        {"champ": {"url": champion_url}, "chal": {"url": challenger_url, "model": "chal-v2"}},
        key_prefix="aibrix", redis_url=None,
        routes=[{"name": "r", "match": {"path_prefix": "/v1"}, "champion": "champ",
                 "challenger": "chal", "shadow": {"target": "chal", "sample_rate": 1.0}}],
    ))  # fmt: skip
    plan: list[tuple[tuple[int, int] | None, bool]] = [((100, 20), False)] * 6 + [
        ((1000, 300), True)
    ] * 4
    await send_plan(http, proxy_url(gateway), plan)
    n = len(plan)

    async def shadows_done() -> bool:
        _, report = await admin_json(http, gateway, "/api/v1/routes/r/shadow")
        return report["in_flight"] == 0 and sum(report["outcomes"].values()) == n

    await wait_until(shadows_done, "every shadow call finished", within=5)
    assert challenger.shadow_calls == n and challenger.calls == n  # all of it mirrored
    assert await _all_traced(http, gateway, "champ") == (n, expected_buckets(u for u, _ in plan))
    assert await _all_traced(http, gateway, "chal-v2") == (n, Counter({bucket_pair(40, 7): n}))
    _, listing = await admin_json(http, gateway, "/api/v1/traces")
    assert [m["model"] for m in listing["models"]] == ["chal-v2", "champ"]


# ---------------------------------------------------------------- admin API


async def test_admin_traces_api_shapes(start_llm: StartLLM, http: aiohttp.ClientSession) -> None:
    gateway = await start_llm("foo", key_prefix="px", redis_url=None)
    assert await admin_json(http, gateway, "/api/v1/traces") == (200, {"models": []})
    status, body = await admin_json(http, gateway, "/api/v1/traces/foo")
    assert status == 404 and body["error"]["code"] == "unknown_model"

    await send_plan(http, proxy_url(gateway), MIXED_PLAN)
    status, listing = await admin_json(http, gateway, "/api/v1/traces")
    assert status == 200
    assert listing == {
        "models": [{"model": "foo", "pending": 0, "windows": listing["models"][0]["windows"]}]
    }
    status, body = await admin_json(http, gateway, "/api/v1/traces/nope")
    assert status == 404 and body["error"]["code"] == "unknown_model"

    async def closed() -> dict[str, Any] | None:
        _, view = await admin_json(http, gateway, "/api/v1/traces/foo")
        return view if view["current"] is None and view["windows"] else None

    view = await wait_until(closed, "the windows to close", within=4)
    assert set(view) == {"model", "pending", "current", "windows"}
    assert view["model"] == "foo" and view["pending"] == 0
    for window in view["windows"]:
        assert set(window) == {"window_end", "key", "trace"}
        assert window["key"] == trace_key("px", "foo", window["window_end"])
        assert_wire_format(serialize(window["trace"]), INTERVAL)
    assert bucket_totals(w["trace"] for w in view["windows"]) == expected_buckets(
        u for u, _ in MIXED_PLAN
    )
    _, listing = await admin_json(http, gateway, "/api/v1/traces")
    assert listing["models"][0]["windows"] == len(view["windows"])

    _, routes = await admin_json(http, gateway, "/api/v1/routes")
    assert routes["state"]["backend"] == "embedded" and routes["state"]["status"] == "ok"


async def test_admin_traces_api_when_tracing_is_disabled(
    start_llm: StartLLM, http: aiohttp.ClientSession
) -> None:
    gateway = await start_llm(None, key_prefix="px", redis_url=None, tracing={"enabled": False})
    await send_plan(http, proxy_url(gateway), MIXED_PLAN[:2])
    for path in ("/api/v1/traces", "/api/v1/traces/llm"):
        status, body = await admin_json(http, gateway, path)
        assert status == 404 and body["error"]["code"] == "tracing_disabled"
