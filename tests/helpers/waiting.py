"""Waiting for an outcome the test can observe, with a deadline: never a fixed sleep that
hopes the outcome has happened by then.

``wait_until`` is the one poll the tests use; ``wait_until_sync`` is its twin for the
few places that cannot await (starting a redis-server from a synchronous fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar, cast

T = TypeVar("T")

Ignored = tuple[type[BaseException], ...]


class _Wait:
    """One wait: when it started, what its condition last gave, and the error it raises
    once ``within`` seconds have passed."""

    def __init__(self, what: str, within: float, ignoring: Ignored) -> None:
        self.what, self.within, self.ignoring = what, within, ignoring
        self.started = time.monotonic()
        self.last: object = None

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one check: an error the wait ignores is "not yet"."""
        try:
            yield
        except self.ignoring as error:
            self.last = error

    def done(self, value: object) -> bool:
        self.last = value
        return bool(value)

    def check_time(self) -> None:
        waited = time.monotonic() - self.started
        if waited > self.within:
            shown = repr(self.last)
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
    wait = _Wait(what, within, ignoring)
    while True:
        with wait.attempt():
            result = condition()
            value = cast(T, await result if inspect.isawaitable(result) else result)
            if wait.done(value):
                return value
        wait.check_time()
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
    wait = _Wait(what, within, ignoring)
    while True:
        with wait.attempt():
            if wait.done(value := condition()):
                return value
        wait.check_time()
        time.sleep(every)
