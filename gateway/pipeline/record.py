"""Step 5, Record: what a request leaves behind. Counts in memory only (no store or
Redis call per request): the in-flight gauge, the answer's status and latency, and the
backend model's load trace (pending at the start, done with token counts at the end).

Upstream error reasons are counted where the error is caught (``metrics.upstream_error``),
since only that place knows the reason.
"""

from __future__ import annotations

import time
from typing import Protocol

from gateway.metrics import RouteMetrics
from gateway.pipeline.exchange import Exchange
from gateway.runtime import LoadTrace


class LoadTracer(Protocol):
    """Counts each backend's load into trace windows (gateway.tracing.TraceWriter)."""

    perf_offset: float  # wall-clock time minus perf_counter(), kept current by the tracer

    def trace_of(self, model: str) -> LoadTrace: ...


def begin(exchange: Exchange, tracer: LoadTracer | None) -> None:
    """The request is on its way to the backend: in flight, and pending in its trace."""
    lane = exchange.lane
    lane.metrics.in_flight += 1
    if tracer is not None:
        trace = lane.trace
        if trace is None:
            trace = lane.trace = tracer.trace_of(lane.model or lane.pool.model)
        trace.add(exchange.started + tracer.perf_offset)
        exchange.trace = trace


def count(metrics: RouteMetrics, status: int, started: float) -> float:
    """An answer (the backend's or the gateway's own) went out; returns when."""
    finished = time.perf_counter()
    metrics.count(status, finished - started)
    return finished


def end(exchange: Exchange, tracer: LoadTracer | None) -> None:
    """The exchange is over, however it ended: out of flight, done in its trace."""
    exchange.lane.metrics.in_flight -= 1
    trace = exchange.trace
    if trace is None or tracer is None:
        return
    now = (exchange.finished or time.perf_counter()) + tracer.perf_offset
    if exchange.answer is not None:
        trace.done_answer(now, exchange.answer)
    elif exchange.answered:
        prompt_tokens, completion_tokens = exchange.tokens
        trace.done(now, prompt_tokens, completion_tokens)
    else:  # the backend never answered: no tokens to count
        trace.discard(now)
