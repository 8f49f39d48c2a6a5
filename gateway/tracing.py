"""Trace window writer: the I/O shell around ``gateway.core.trace``.

The request path only counts in memory (``add``/``done``: a clock read and a few dict
operations, no Redis call). A background task wakes just after each window boundary,
takes the windows that closed and sends each to Redis with one server-side merge, so
replicas writing the same window add up instead of overwriting each other; the merges
go out in pipelines, a round trip per hundred models rather than per model.

While Redis is unreachable the closed windows wait in a backlog, bounded by what their
TTL would still keep, and are written with their *remaining* TTL once it is back; a
window whose TTL has run out is dropped, since Redis would have expired it by now anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.core.trace import (
    AnswerBatch,
    FinishedWindow,
    ModelTrace,
    serialize,
    trace_key,
    window_end,
)

log = logging.getLogger(__name__)

OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_DROPPED = "dropped"

# The handle a caller keeps between add() and done(): the model's trace itself. done()
# counts into whatever window is open when it runs, which is what makes a request that
# straddles a boundary count its arrival in one window and its tokens in the next.
TraceHandle = ModelTrace

# KEYS[1]: trace key. KEYS[2]: marker of this particular write.
# ARGV[1]: this replica's window as JSON. ARGV[2]: remaining TTL in ms.
# The marker makes a retry after a lost reply (the script ran, the answer never came
# back) a no-op instead of counting the window twice. It is set only once nothing can
# fail any more (Redis keeps what a failing script wrote), so a merge that failed is
# retried in full. A key holding another type reads as absent and is replaced, as one
# holding text that is not JSON is. Redis's cjson neither sorts keys nor keeps integers
# integral (it may print 1e+14 or 3.0), so the merged object is written by hand from
# sorted keys with %d.
MERGE_SCRIPT = """
local cur = redis.pcall('GET', KEYS[1])
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  return 0
end
local merged = {}
if type(cur) == 'string' then
  local ok, old = pcall(cjson.decode, cur)
  if ok and type(old) == 'table' then
    for k, v in pairs(old) do
      if type(v) == 'number' then merged[k] = v end
    end
  end
end
local constant = {meta_v = true, meta_precision = true, meta_interval_sec = true}
for k, v in pairs(cjson.decode(ARGV[1])) do
  if constant[k] then
    merged[k] = v
  else
    merged[k] = (merged[k] or 0) + v
  end
end
local keys = {}
for k in pairs(merged) do keys[#keys + 1] = k end
table.sort(keys)
local parts = {}
for i, k in ipairs(keys) do
  parts[i] = cjson.encode(k) .. ':' .. string.format('%d', merged[k])
end
redis.call('SET', KEYS[1], '{' .. table.concat(parts, ',') .. '}', 'PX', ARGV[2])
return 1
"""


# Window writes sent in one pipeline. With many models, one round trip for each would
# take most of the 500 ms AIBrix allows after a boundary once Redis is a millisecond
# away (200 models: 200 ms), and cost the gateway's CPU about 190 us each.
WRITE_BATCH = 100


@dataclass(frozen=True, slots=True)
class _PendingWrite:
    key: str
    marker: str
    payload: bytes
    expires_at: float  # window end + ttl: when Redis would drop the key anyway


class TraceWriter:
    """Per-model request traces, written to Redis once per window.

    ``redis=None`` is the embedded mode: windows are still closed on schedule and kept
    for ``recent()`` (the admin API's ``GET /api/v1/traces/{model}``), just not shipped.
    The client should fail fast (small socket timeouts, few retries); each write is also
    capped at ``write_timeout`` so a hung Redis cannot stall the writer.
    """

    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        key_prefix: str = "aibrix",
        interval_seconds: int = 10,
        ttl_seconds: float = 600,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_write: Callable[[str], None] | None = None,
        recent_windows: int = 60,
        write_delay: float = 0.05,
        write_timeout: float = 2.0,
        retry_seconds: float = 1.0,
        max_backlog: int = 100_000,
    ) -> None:
        if interval_seconds <= 0 or int(interval_seconds) != interval_seconds:
            raise ValueError(f"interval_seconds must be a positive integer, got {interval_seconds}")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self.key_prefix = key_prefix
        self.interval = int(interval_seconds)
        self.ttl = float(ttl_seconds)
        self._redis = redis
        self._merge_sha = hashlib.sha1(MERGE_SCRIPT.encode()).hexdigest()
        self.clock = clock  # wall clock, seconds: windows are aligned to unix time
        # clock() is perf_counter() + perf_offset. The proxy reads perf_counter() at each
        # request's start and end anyway (for its latency); with the offset those readings
        # are its trace times too: an addition instead of two clock calls per request.
        # Refreshed every cycle, so a stepped wall clock is followed within a window.
        self.refresh_perf_offset()  # sets perf_offset
        self._sleep = sleep
        self._on_write = on_write
        self._recent_windows = recent_windows
        # Waking a little after the boundary lets requests that finish right on it land
        # in their window's successor deterministically; AIBrix expects the write within
        # 500 ms of the boundary.
        self._write_delay = write_delay
        self._write_timeout = write_timeout
        self._retry_seconds = retry_seconds
        self._max_backlog = max_backlog
        self._traces: dict[str, ModelTrace] = {}
        self._answers = AnswerBatch()  # whole answers of all models, read a batch at a time
        self._recent: dict[str, deque[dict[str, Any]]] = {}
        self._backlog: deque[_PendingWrite] = deque()
        self.writer_id = uuid.uuid4().hex
        self._seq = itertools.count()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- request path: synchronous, in memory --------------------------------------------

    def trace_of(self, model: str) -> ModelTrace:
        """The model's trace, the same object for the writer's whole life. The proxy keeps
        it and calls ``add``/``done``/``done_answer``/``discard`` on it itself, with
        ``perf_counter() + perf_offset`` for the time: two Python calls fewer per request
        than going through the methods below."""
        trace = self._traces.get(model)
        if trace is None:
            trace = self._traces[model] = ModelTrace(self.interval, self.clock(), self._answers)
        return trace

    def add(self, model: str) -> TraceHandle:
        trace = self.trace_of(model)
        trace.add(self.clock())
        return trace

    def done(self, handle: TraceHandle, in_tokens: int, out_tokens: int) -> None:
        """The answer ended; call exactly once per ``add``. Use 0 for unknown tokens."""
        handle.done(self.clock(), in_tokens, out_tokens)

    def discard(self, handle: TraceHandle) -> None:
        """The request ended without an answer to count (instead of ``done``)."""
        handle.discard(self.clock())

    # -- views ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self._traces)

    def recent(self, model: str) -> list[dict[str, Any]]:
        """Closed windows of ``model``, oldest first: ``{"window_end", "key", "trace"}``."""
        return list(self._recent.get(model, ()))

    def current(self, model: str) -> dict[str, Any] | None:
        """The open window so far (not yet written), in the same shape as ``recent``."""
        trace = self._traces.get(model)
        window = None if trace is None else trace.peek_open()
        return None if window is None else self._view(model, window)

    def pending(self, model: str) -> int:
        trace = self._traces.get(model)
        return 0 if trace is None else max(trace.pending, 0)

    @property
    def backlog_size(self) -> int:
        return len(self._backlog)

    # -- background side -----------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="trace-writer")

    async def stop(self, *, flush_open: bool = True) -> None:
        """Stop the loop; with ``flush_open`` also write the unfinished window.

        The unfinished window is written under its own (future) end, so whatever another
        replica, or this gateway after a restart, writes for it later merges in.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            self._collect(self.clock())
            if flush_open:
                for model, trace in self._traces.items():
                    window = trace.take_open()
                    if window is not None:
                        self._enqueue(model, window)
            await self._write_backlog()

    def refresh_perf_offset(self) -> None:
        self.perf_offset = self.clock() - time.perf_counter()

    async def flush(self) -> bool:
        """Collect closed windows and write the backlog. True if nothing is left over."""
        self.refresh_perf_offset()
        async with self._lock:
            self._collect(self.clock())
            return await self._write_backlog()

    async def _run(self) -> None:
        while True:
            now = self.clock()
            target = window_end(now, self.interval) + self._write_delay
            if self._backlog:
                target = min(target, now + self._retry_seconds)
            await self._sleep(max(0.0, target - now))
            try:
                await self.flush()
            except Exception:  # the writer must outlive any one bad cycle
                log.exception("trace writer cycle failed")

    def _collect(self, now: float) -> None:
        for model, trace in self._traces.items():
            for window in trace.take_finished(now):
                self._enqueue(model, window)

    def _enqueue(self, model: str, window: FinishedWindow) -> None:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque(maxlen=self._recent_windows)
        recent.append(self._view(model, window))
        if self._redis is None:
            return
        self._backlog.append(
            _PendingWrite(
                key=trace_key(self.key_prefix, model, window.window_end),
                marker=(
                    f"{self.key_prefix}:gateway_trace_write:{self.writer_id}:{next(self._seq)}"
                ),
                payload=serialize(window.trace),
                expires_at=window.window_end + self.ttl,
            )
        )
        while len(self._backlog) > self._max_backlog:
            self._backlog.popleft()
            self._count(OUTCOME_DROPPED)

    async def _write_backlog(self) -> bool:
        redis = self._redis
        if redis is None:
            return True
        sha = self._merge_sha
        script_loaded = False
        while self._backlog:
            batch = self._next_batch()
            if not batch:
                continue  # the front of the backlog had expired and was dropped
            try:
                async with asyncio.timeout(self._write_timeout):
                    async with redis.pipeline(transaction=False) as pipe:
                        for item, ttl_ms in batch:
                            pipe.evalsha(sha, 2, item.key, item.marker, item.payload, ttl_ms)
                        results = await pipe.execute(raise_on_error=False)
                for result in results:
                    if isinstance(result, NoScriptError) and not script_loaded:
                        # A restarted (or flushed) Redis forgot the script: load it and
                        # send again from here; what went before is written.
                        async with asyncio.timeout(self._write_timeout):
                            await redis.script_load(MERGE_SCRIPT)
                        script_loaded = True
                        break
                    if isinstance(result, Exception):
                        raise result
                    self._backlog.popleft()
                    self._count(OUTCOME_OK)
            except (RedisError, OSError, TimeoutError) as exc:
                # Keep it (and everything behind it) for the next attempt; trying the
                # rest now would only pile up timeouts against a Redis that is down.
                # Merges behind it that did run are not counted twice: their markers
                # make the retry a no-op.
                self._count(OUTCOME_ERROR)
                failed, waiting = self._backlog[0].key, len(self._backlog)  # those before: written
                log.warning("trace write %s failed (%d waiting): %s", failed, waiting, exc)
                return False
        return True

    def _next_batch(self) -> list[tuple[_PendingWrite, int]]:
        """Up to WRITE_BATCH writes from the front of the backlog, each with its remaining
        TTL in ms. Writes whose TTL has run out are dropped from the front (Redis would
        have expired them by now); the batch ends before any further back."""
        now = self.clock()
        batch: list[tuple[_PendingWrite, int]] = []
        for item in self._backlog:
            remaining_ms = int((item.expires_at - now) * 1000)
            if remaining_ms <= 0:
                if batch:
                    break
                self._backlog.popleft()
                self._count(OUTCOME_DROPPED)
                return batch
            batch.append((item, remaining_ms))
            if len(batch) >= WRITE_BATCH:
                break
        return batch

    def _count(self, outcome: str) -> None:
        if self._on_write is not None:
            self._on_write(outcome)

    def _view(self, model: str, window: FinishedWindow) -> dict[str, Any]:
        return {
            "window_end": window.window_end,
            "key": trace_key(self.key_prefix, model, window.window_end),
            "trace": window.trace,
        }
