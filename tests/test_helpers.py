"""The shared test helpers do what the tests rely on: a wait returns what its condition
found, or fails naming what it waited for; the fake clock moves only when told."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.clock import FakeClock
from tests.helpers.waiting import wait_until, wait_until_sync


async def test_wait_until_returns_the_first_truthy_value_of_a_sync_or_async_condition() -> None:
    calls: list[int] = []

    def sync_check() -> list[int] | None:
        calls.append(1)
        return calls if len(calls) == 3 else None

    assert await wait_until(sync_check, "three calls", every=0) == [1, 1, 1]

    async def async_check() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await wait_until(async_check, "an async answer") == "done"


async def test_wait_until_fails_naming_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.\d+s .* the moon \(last: 0\)"):
        await wait_until(lambda: 0, "the moon", within=0.05)


async def test_wait_until_treats_ignored_errors_as_not_yet_and_others_as_failures() -> None:
    attempts = iter([ConnectionError("down"), ConnectionError("down"), "up"])

    def check() -> str:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await wait_until(check, "the server", every=0, ignoring=(ConnectionError,)) == "up"

    def broken() -> bool:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await wait_until(broken, "a condition that raises what it does not ignore")


def test_wait_until_sync_polls_and_fails_like_its_async_twin() -> None:
    clock = FakeClock(0.0)
    assert wait_until_sync(lambda: clock.advance(1) >= 3, "three ticks", every=0) is True
    with pytest.raises(AssertionError, match=r"waiting for nothing \(last: False\)"):
        wait_until_sync(lambda: False, "nothing", within=0.05)


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(100.0)
    assert clock() == clock() == 100.0
    assert clock.advance(2.5) == 102.5 and clock() == 102.5
    clock.now = 7.0
    assert clock() == 7.0
    assert FakeClock()() == 1_000_000.0
