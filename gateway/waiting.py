"""What the event loop's tasks are waiting on, for a log line when something that should
end does not (a shutdown that outlives its drain): each task with its chain of awaited
coroutines, outermost first, and the future at the end of it."""

from __future__ import annotations

import asyncio
from typing import Any

# A chain longer than this is cut: a log line, not a traceback.
_MAX_DEPTH = 24


def describe_tasks() -> list[str]:
    """One line per task of the running loop, but the caller's own."""
    current = asyncio.current_task()
    return sorted(describe(task) for task in asyncio.all_tasks() if task is not current)


def describe(task: asyncio.Task[Any]) -> str:
    steps: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(steps) < _MAX_DEPTH:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            frame = getattr(awaited, "gi_frame", None)
        if frame is None:  # a future (what awaiting one yields), or a finished coroutine
            kind = type(awaited).__name__
            steps.append("Future" if kind == "FutureIter" else kind)
            break
        code = frame.f_code
        steps.append(f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "ag_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
        )
    return f"{task.get_name()}: " + " -> ".join(steps)
