"""``gateway demo``'s canary, in this process with short timings: its load generator
drives a healthy challenger to awaiting promotion, and one failing a fifth of its
requests to a rollback. The real demo's pace (about a minute) is ``CanaryTimings()``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.demo import CanaryTimings, Demo
from tests.cli_support import run_main
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

FAST = CanaryTimings(
    steps=(0.2, 0.5, 1.0),
    step_interval_seconds=0.5,
    evaluation_interval_seconds=0.2,
    min_requests=10,
)


@pytest.fixture
async def demos() -> AsyncIterator[list[Demo]]:
    """Demos the test starts, stopped at its end whatever happens."""
    started: list[Demo] = []
    yield started
    for demo in started:
        await demo.stop()


async def start_demo(demos: list[Demo], error_rate: float = 0.0) -> Demo:
    demo = Demo(port=0, admin_port=0, error_rate=error_rate, canary=FAST, load_per_second=200)
    demos.append(demo)
    await demo.start()
    return demo


def admin(demo: Demo, path: str = "") -> str:
    assert demo.gateway is not None
    return f"http://127.0.0.1:{demo.gateway.admin_port}{path}"


async def canary_reaches(
    http: aiohttp.ClientSession, demo: Demo, *states: str, within: float = 20
) -> Any:
    async def check() -> Any:
        async with http.get(admin(demo, "/api/v1/routes/sentiment/canary")) as response:
            assert response.status == 200, await response.text()
            view = await response.json()
        return view if view["state"] in states else None

    return await wait_until(check, f"the demo's canary to be {' or '.join(states)}", within=within)


def test_the_real_demo_takes_about_a_minute() -> None:
    """At the default load, each step of the default timings has enough requests for both
    variants, and the last step is passed in about a minute."""
    timings, load = CanaryTimings(), Demo().load_per_second
    assert timings.steps[-1] == 1.0
    for weight in timings.steps:
        quieter = min(weight, 1 - weight) if weight < 1 else weight
        assert quieter * load * timings.step_interval_seconds >= 2 * timings.min_requests
    total = len(timings.steps) * (
        timings.step_interval_seconds + timings.evaluation_interval_seconds
    )
    assert 40 <= total <= 80


async def test_a_healthy_challenger_awaits_promotion(
    demos: list[Demo], http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = await start_demo(demos)
    banner = demo.banner()
    assert f"gateway canary status sentiment --watch --admin {admin(demo)}" in banner
    assert f"gateway canary promote sentiment --admin {admin(demo)}" in banner
    assert f"gateway canary rollback sentiment --admin {admin(demo)}" in banner

    view = await canary_reaches(http, demo, "awaiting_promotion", "rolled_back")
    assert view["state"] == "awaiting_promotion", view["last_decision"]
    assert view["reason"] == "last_step_passed"
    advanced = [(e["reason"], e["weight"]) for e in view["history"] if e["action"] == "advance"]
    # Every step in order, then the last one passed.
    assert advanced == [("healthy", 0.5), ("healthy", 1.0), ("last_step_passed", 1.0)]
    for variant in ("champion", "challenger"):
        counts = view["counts"]["canary"][variant]
        assert counts["requests"] >= FAST.min_requests and counts["failures"] == 0
    # Load with distinct request IDs, every request answered.
    assert set(demo.load_statuses) == {200}, demo.load_statuses

    # The banner's promote command does what it says.
    promoted = await run_main(capsys, "canary", "promote", "sentiment", "--admin", admin(demo))
    assert promoted.returncode == 0, promoted.describe()
    assert promoted.stdout.startswith("sentiment: promoted, step 3 of 3")


async def test_a_failing_challenger_is_rolled_back(
    demos: list[Demo], http: aiohttp.ClientSession
) -> None:
    demo = await start_demo(demos, error_rate=0.2)
    view = await canary_reaches(http, demo, "rolled_back", "awaiting_promotion")
    assert view["state"] == "rolled_back", view["history"]
    assert view["reason"] in ("error_rate_increase", "below_success_threshold"), view["reason"]
    assert view["weight"] == 0.0
    assert view["last_decision"]["action"] == "rollback"
    failed = view["counts"]["canary"]["challenger"]
    assert failed["failures"] > 0 and view["counts"]["canary"]["champion"]["failures"] == 0
    assert demo.gateway is not None and demo.gateway.routes["sentiment"].weight == 0.0
    assert demo.load_statuses.get(500, 0) > 0


async def test_stopping_the_demo_stops_its_load(demos: list[Demo]) -> None:
    demo = await start_demo(demos)

    def load_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "demo-load"]

    assert load_tasks()
    await demo.stop()
    demos.remove(demo)
    assert not load_tasks()
