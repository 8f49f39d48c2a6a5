"""Waiting for an outcome the test can observe, with a deadline: never a fixed sleep that
hopes the outcome has happened by then.

``wait_until`` is the one poll the tests use; ``wait_until_sync`` is its twin for the
few places that cannot await (starting a redis-server from a synchronous fixture).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")

Ignored = tuple[type[BaseException], ...]


class _Deadline:
    """The time a wait started, and the error it raises once ``within`` seconds passed."""

    def __init__(self, what: str, within: float) -> None:
        self.what, self.within = what, within
        self.started = time.monotonic()

    def check(self, last: object) -> None:
        waited = time.monotonic() - self.started
        if waited > self.within:
            shown = repr(last)
            if len(shown) > 300:
                shown = shown[:300] + "..."
            raise AssertionError(
                f"timed out after {waited:.2f}s (limit {self.within}s) waiting for "
                f"{self.what} (last: {shown})"
            )


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    within: float = 5.0,
    every: float = 0.01,
    ignoring: Ignored = (),
) -> T:
    """Poll ``condition`` (a plain or an async callable) every ``every`` seconds until it
    returns something truthy, and return that. An exception of a type in ``ignoring``
    counts as "not yet". After ``within`` seconds, raise an AssertionError naming
    ``what``, the time waited and the last result. A wait fails only after a check made
    once the time is up, so a late wake-up cannot fail a condition that holds by then."""
    deadline = _Deadline(what, within)
    while True:
        last: object
        try:
            result = condition()
            value = cast(T, await result if inspect.isawaitable(result) else result)
        except ignoring as error:
            last = error
        else:
            if value:
                return value
            last = value
        deadline.check(last)
        await asyncio.sleep(every)


def wait_until_sync(
    condition: Callable[[], T],
    what: str,
    *,
    within: float = 5.0,
    every: float = 0.02,
    ignoring: Ignored = (),
) -> T:
    """``wait_until`` for synchronous code: blocks the thread between polls."""
    deadline = _Deadline(what, within)
    while True:
        last: object
        try:
            value = condition()
        except ignoring as error:
            last = error
        else:
            if value:
                return value
            last = value
        deadline.check(last)
        time.sleep(every)
