"""The trace writer against real redis-servers: contents, merging, outages, command cost."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.core.trace import merge, serialize, trace_key, window_end
from gateway.tracing import MERGE_SCRIPT, TraceWriter
from tests.helpers.clock import FakeClock
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import (  # noqa: F401  (fixtures)
    SHARED_REDIS_PORT,
    SHARED_REDIS_URL,
    RedisServer,
    fast_client,
    private_redis,
    redis_prefix,
    shared_redis,
)
from tests.trace_support import flush_after, serve

INTERVAL = 10
T0 = 1_700_000_000.0  # a window start (multiple of INTERVAL)


def writer(
    client: aioredis.Redis | None,
    prefix: str,
    clock: FakeClock,
    *,
    interval: int = INTERVAL,
    ttl: float = 600,
    recent_windows: int = 60,
) -> tuple[TraceWriter, Counter[str]]:
    outcomes: Counter[str] = Counter()
    w = TraceWriter(
        client, key_prefix=prefix, interval_seconds=interval, ttl_seconds=ttl, clock=clock,
        on_write=lambda outcome: outcomes.update([outcome]), recent_windows=recent_windows,
    )
    return w, outcomes


# -- contents ----------------------------------------------------------------------------


async def test_window_key_holds_exactly_what_was_counted(
    shared_redis: aioredis.Redis, redis_prefix: str  # noqa: F811
) -> None:
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(shared_redis, redis_prefix, clock)
    serve(w, clock, 3, "llama", (100, 20))  # 66:43
    serve(w, clock, 2, "llama", (1000, 1000))  # 100:100
    serve(w, clock, 1, "llama", (0, 0))  # no usage in the answer
    open_req = w.add("llama")  # still in flight at the boundary
    w.add("other")  # a second model, never finished
    assert await flush_after(w, clock, T0 + INTERVAL)

    key = trace_key(redis_prefix, "llama", int(T0) + INTERVAL)
    raw = await shared_redis.get(key)
    assert raw == (
        b'{"0:0":1,"100:100":2,"66:43":3,"meta_interval_sec":10,"meta_pending_reqs":1,'
        b'"meta_precision":10,"meta_total_reqs":7,"meta_v":3}'
    )
    ttl_ms = await shared_redis.pttl(key)
    assert 599_000 < ttl_ms <= 599_950  # 600 s from the window end, 50 ms of it gone
    other = orjson.loads(await shared_redis.get(trace_key(redis_prefix, "other", int(T0) + 10)))
    assert other["meta_total_reqs"] == 1 and other["meta_pending_reqs"] == 1
    assert outcomes == Counter(ok=2)

    # The request open at the boundary finishes in the next window: tokens counted there.
    clock.now = T0 + 12
    w.done(open_req, 3, 3)
    assert await flush_after(w, clock, T0 + 2 * INTERVAL)
    nxt = orjson.loads(await shared_redis.get(trace_key(redis_prefix, "llama", int(T0) + 20)))
    assert nxt == {"16:16": 1, "meta_interval_sec": 10, "meta_pending_reqs": 0,
                   "meta_precision": 10, "meta_total_reqs": 0, "meta_v": 3}
    # Idle windows write nothing.
    assert await shared_redis.get(trace_key(redis_prefix, "other", int(T0) + 20)) is None


async def test_two_replicas_writing_one_window_add_up(redis_prefix: str) -> None:  # noqa: F811
    clients = [fast_client(SHARED_REDIS_URL), fast_client(SHARED_REDIS_URL)]
    clock = FakeClock(T0 + 1)
    try:
        a, _ = writer(clients[0], redis_prefix, clock)
        b, _ = writer(clients[1], redis_prefix, clock)
        serve(a, clock, 5, "m", (100, 20))
        serve(b, clock, 7, "m", (100, 20))
        serve(b, clock, 2, "m", (4, 4))
        a.add("m")
        b.add("m")
        b.add("m")
        clock.now = T0 + INTERVAL + 0.05
        await asyncio.gather(a.flush(), b.flush())
        got = orjson.loads(await clients[0].get(trace_key(redis_prefix, "m", int(T0) + 10)))
        assert got == {"66:43": 12, "20:20": 2, "meta_interval_sec": 10,
                       "meta_pending_reqs": 3, "meta_precision": 10, "meta_total_reqs": 17,
                       "meta_v": 3}
    finally:
        for c in clients:
            await c.aclose()


async def test_lua_merge_matches_the_python_rule_and_stays_integral(
    shared_redis: aioredis.Redis, redis_prefix: str  # noqa: F811
) -> None:
    merge_script = shared_redis.register_script(MERGE_SCRIPT)
    key = f"{redis_prefix}:m_request_trace_1700000010"
    # What an AIBrix gateway (or an older writer) left there, with a count large enough
    # that Lua's cjson would print it as 1e+14 if encoded naively.
    existing = {"1:1": 100_000_000_000_000, "12:3": 4, "meta_v": 3, "meta_precision": 10,
                "meta_interval_sec": 10, "meta_total_reqs": 7, "meta_pending_reqs": 2}
    await shared_redis.set(key, orjson.dumps(existing))
    incoming = {"1:1": 1, "2:10": 5, "meta_v": 3, "meta_precision": 10,
                "meta_interval_sec": 10, "meta_total_reqs": 6, "meta_pending_reqs": 1}
    assert await merge_script(
        keys=[key, f"{redis_prefix}:w1"], args=[serialize(incoming), 60_000]
    ) == 1
    assert await shared_redis.get(key) == serialize(merge(existing, incoming))
    assert b'"1:1":100000000000001,' in await shared_redis.get(key)
    # The same write retried (its reply was lost) is a no-op, not a double count.
    assert await merge_script(
        keys=[key, f"{redis_prefix}:w1"], args=[serialize(incoming), 60_000]
    ) == 0
    assert await shared_redis.get(key) == serialize(merge(existing, incoming))
    # Garbage in the key is replaced rather than wedging every later write.
    await shared_redis.set(key, b"not json")
    await merge_script(keys=[key, f"{redis_prefix}:w2"], args=[serialize(incoming), 60_000])
    assert await shared_redis.get(key) == serialize(incoming)


# -- outages -----------------------------------------------------------------------------


async def test_redis_outage_keeps_windows_and_writes_them_with_remaining_ttl(
    private_redis: RedisServer,  # noqa: F811
) -> None:
    client = fast_client(private_redis.url)
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(client, "aibrix", clock, ttl=35)
    try:
        private_redis.stop()
        expected: dict[int, int] = {}
        for i in range(4):  # four windows of load while Redis is down
            n = 10 + i
            serve(w, clock, n, "m", (2, 2))
            expected[int(T0) + INTERVAL * (i + 1)] = n
            # The requests above were unaffected; the writes wait.
            assert not await flush_after(w, clock, T0 + INTERVAL * (i + 1))
        assert outcomes["error"] == 4 and outcomes["ok"] == 0
        assert w.backlog_size == 4

        # Back 6 s after the last boundary: the oldest window (end T0+10) is past its
        # 35 s TTL and is dropped, as Redis would have expired it; the rest are written
        # with what is left of theirs.
        private_redis.start()
        clock.now = T0 + 40 + 6
        assert await w.flush()
        assert outcomes["dropped"] == 1 and outcomes["ok"] == 3
        assert w.backlog_size == 0
        for end, n in expected.items():
            key = trace_key("aibrix", "m", end)
            raw = await client.get(key)
            if end == int(T0) + 10:
                assert raw is None
                continue
            trace = orjson.loads(raw)
            assert trace["10:10"] == n and trace["meta_total_reqs"] == n
            remaining_ms = (end + 35 - clock.now) * 1000
            assert remaining_ms - 1000 < await client.pttl(key) <= remaining_ms
    finally:
        await client.aclose()


async def test_background_loop_writes_within_500ms_of_the_boundary(
    shared_redis: aioredis.Redis, redis_prefix: str  # noqa: F811
) -> None:
    w, outcomes = writer(shared_redis, redis_prefix, FakeClock(T0 + 1), interval=1)
    w.clock = time.time  # real time for this one
    w.start()
    try:
        h = w.add("m")
        w.done(h, 5, 5)
        end = window_end(time.time(), 1)
        key = trace_key(redis_prefix, "m", end)

        async def written() -> bool:
            return await shared_redis.get(key) is not None

        left = end + 3 - time.time()
        await wait_until(written, f"the window ending at {end}", within=left, every=0.005)
        assert time.time() - end < 0.5
        assert outcomes["ok"] == 1
    finally:
        await w.stop()


async def test_stop_writes_the_open_window(
    shared_redis: aioredis.Redis, redis_prefix: str  # noqa: F811
) -> None:
    clock = FakeClock(T0 + 1)
    w, _ = writer(shared_redis, redis_prefix, clock)
    w.start()
    serve(w, clock, 4, "m", (2, 2))
    await w.stop()
    got = orjson.loads(await shared_redis.get(trace_key(redis_prefix, "m", int(T0) + 10)))
    assert got["10:10"] == 4 and got["meta_total_reqs"] == 4


# -- cost --------------------------------------------------------------------------------


async def test_redis_commands_are_per_window_not_per_request(
    private_redis: RedisServer,  # noqa: F811
) -> None:
    client = fast_client(private_redis.url)
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(client, "aibrix", clock)
    try:
        async def windows(requests_per_window: int) -> dict[str, int]:
            private_redis.reset_stats()
            for _ in range(3):
                for model in ("a", "b"):
                    serve(w, clock, requests_per_window, model, (100, 20))
                assert await flush_after(w, clock, window_end(clock.now, INTERVAL))
            stats = private_redis.command_stats()
            # Our own stats connection (its handshake and INFO), not the writer's.
            for ours in ("config|resetstat", "info", "hello", "client|setinfo"):
                stats.pop(ours, None)
            return stats

        await client.ping()  # connection handshake out of the way
        small = await windows(500)  # 1,000 requests per window
        large = await windows(5000)  # 10,000 requests per window
        # One merge per model per window; SCRIPT LOAD once, after the first NOSCRIPT
        # (which both merges of that flush's pipeline met: they are sent again).
        assert large == {"evalsha": 6, "set": 12, "get": 6}, large
        assert small["evalsha"] == 6 + 2 and small.get("script|load") == 1, small
        assert outcomes["ok"] == 12
    finally:
        await client.aclose()


class SlowLink:
    """A TCP relay to Redis that holds every chunk the client sends for ``delay`` seconds:
    a Redis a few milliseconds away, where each round trip costs at least that."""

    def __init__(self, port: int, delay: float) -> None:
        self.port, self.delay = port, delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.port)
        for source, sink, delay in ((client_r, redis_w, self.delay), (redis_r, client_w, 0.0)):
            task = asyncio.create_task(self._pump(source, sink, delay))
            self.tasks.add(task)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
        try:
            while chunk := await source.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                sink.write(chunk)
                await sink.drain()
        finally:
            sink.close()


async def test_many_models_windows_are_written_in_a_few_round_trips(
    redis_prefix: str,  # noqa: F811
) -> None:
    models = 250
    async with SlowLink(SHARED_REDIS_PORT, delay=0.02) as url:
        client = fast_client(url)
        clock = FakeClock(T0 + 1)
        w, outcomes = writer(client, redis_prefix, clock)
        try:
            await client.ping()  # the handshake's round trips out of the way
            for m in range(models):
                serve(w, clock, m % 3 + 1, f"m{m}", (100, 20))
            clock.now = T0 + INTERVAL + 0.05
            started = time.perf_counter()
            assert await w.flush()
            elapsed = time.perf_counter() - started
        finally:
            await client.aclose()
    # One round trip per window would take models x 20 ms = 5 s; batches of 100 take 3
    # (and 2 more should the script need loading): about 0.1 s, so half the sequential
    # time leaves room for 2 busy cores and still fails the one-at-a-time writer.
    assert elapsed < 2.5, f"{models} windows took {elapsed:.2f}s over a 20 ms link"
    assert outcomes == Counter(ok=models)
    end = int(T0) + INTERVAL
    keys = [trace_key(redis_prefix, f"m{m}", end) for m in range(models)]
    async with aioredis.Redis.from_url(SHARED_REDIS_URL) as direct:
        values = await direct.mget(keys)
    totals = [orjson.loads(v)["meta_total_reqs"] if v is not None else None for v in values]
    assert totals == [m % 3 + 1 for m in range(models)]


async def test_windows_redis_refuses_wait_and_are_written_once(
    private_redis: RedisServer,  # noqa: F811
) -> None:
    client = fast_client(private_redis.url)
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(client, "aibrix", clock)
    end = int(T0) + INTERVAL
    try:
        # Out of memory: Redis refuses every write, the first one of the script too.
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        for model, n in (("a", 2), ("b", 3), ("c", 4)):
            serve(w, clock, n, model, (100, 20))
        assert not await flush_after(w, clock, T0 + INTERVAL)
        assert outcomes == Counter(error=1) and w.backlog_size == 3

        await client.config_set("maxmemory", 0)
        assert await w.flush()
        assert outcomes == Counter(ok=3, error=1) and w.backlog_size == 0
        for model, n in (("a", 2), ("b", 3), ("c", 4)):
            got = orjson.loads(await client.get(trace_key("aibrix", model, end)))
            assert got["meta_total_reqs"] == n and got["66:43"] == n, (model, got)
    finally:
        await client.aclose()


async def test_a_key_of_another_type_is_replaced_not_stuck(
    shared_redis: aioredis.Redis, redis_prefix: str  # noqa: F811
) -> None:
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(shared_redis, redis_prefix, clock)
    key = trace_key(redis_prefix, "m", int(T0) + INTERVAL)
    await shared_redis.rpush(key, "not a trace")
    serve(w, clock, 3, "m", (100, 20))
    assert await flush_after(w, clock, T0 + INTERVAL)
    assert outcomes == Counter(ok=1)
    got = orjson.loads(await shared_redis.get(key))
    assert got["meta_total_reqs"] == 3 and got["66:43"] == 3


# -- embedded mode -----------------------------------------------------------------------


async def test_recent_windows_without_redis() -> None:
    clock = FakeClock(T0 + 1)
    w, outcomes = writer(None, "aibrix", clock, recent_windows=3)
    for i in range(5):
        serve(w, clock, i + 1, "m", (2, 2))
        assert await flush_after(w, clock, T0 + INTERVAL * (i + 1))
    got = w.recent("m")
    assert [r["window_end"] for r in got] == [int(T0) + 30, int(T0) + 40, int(T0) + 50]
    assert [r["trace"]["meta_total_reqs"] for r in got] == [3, 4, 5]
    assert got[-1]["key"] == f"aibrix:m_request_trace_{int(T0) + 50}"
    assert w.recent("unknown") == []
    assert w.models() == ["m"]
    assert w.current("m") is None
    h = w.add("m")
    assert w.current("m")["trace"]["meta_total_reqs"] == 1  # type: ignore[index]
    assert w.pending("m") == 1
    w.discard(h)
    assert w.pending("m") == 0
    assert not outcomes  # nothing is written anywhere


async def test_perf_offset_turns_perf_counter_into_the_writers_clock() -> None:
    """The proxy's trace times are its perf_counter() readings plus perf_offset: they
    must read as the writer's clock, and follow it when the wall clock steps."""
    clock = FakeClock(T0 + 1)
    w, _ = writer(None, "p", clock)
    assert abs(time.perf_counter() + w.perf_offset - clock.now) < 0.05
    clock.now += 3600  # the wall clock steps; the next cycle's flush picks it up
    assert abs(time.perf_counter() + w.perf_offset - clock.now) > 3000
    await w.flush()
    assert abs(time.perf_counter() + w.perf_offset - clock.now) < 0.05


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="interval_seconds"):
        TraceWriter(None, interval_seconds=0)
    with pytest.raises(ValueError, match="interval_seconds"):
        TraceWriter(None, interval_seconds=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl_seconds"):
        TraceWriter(None, ttl_seconds=0)
