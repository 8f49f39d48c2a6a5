"""Helpers for the tests that drive a TraceWriter by hand, on a FakeClock."""

from __future__ import annotations

from gateway.tracing import TraceWriter
from tests.helpers.clock import FakeClock


def serve(
    w: TraceWriter,
    clock: FakeClock,
    n: int,
    model: str,
    tokens: tuple[int, int],
    *,
    each: float = 0.0001,
) -> None:
    """``n`` requests for ``model``, one after the other, each taking ``each`` seconds
    and answered with ``tokens`` (prompt, completion)."""
    for _ in range(n):
        h = w.add(model)
        clock.advance(each)
        w.done(h, *tokens)


async def flush_after(w: TraceWriter, clock: FakeClock, end: float) -> bool:
    """Move the clock just past ``end`` (a window's end) and flush, as the writer's
    background cycle would; returns whether every closed window was written."""
    clock.now = end + 0.05
    return await w.flush()
