"""Event loop choice for the benchmark's own servers and clients."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when installed, as the gateway does, so the baseline is not handicapped."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def uvloop_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uvloop")
    except PackageNotFoundError:
        return None
