"""gateway.waiting: what the loop's tasks wait on, and the log line of a late stop."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from gateway import app as app_module
from gateway.waiting import describe, describe_tasks
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import hung_app
from tests.support import gateway_document, proxy_url

pytestmark = pytest.mark.timeout(30)


async def inner(event: asyncio.Event) -> None:
    await event.wait()


async def outer(event: asyncio.Event) -> None:
    await inner(event)


async def test_a_task_is_described_by_its_chain_of_awaits() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(outer(event), name="the-task")
    await asyncio.sleep(0)  # it runs up to its wait
    try:
        line = describe(task)
        assert line.startswith("the-task: outer (test_waiting.py:")
        assert " -> inner (test_waiting.py:" in line
        assert " -> wait (locks.py:" in line  # asyncio.Event.wait, then its future
        assert line.endswith("-> Future")
        assert line in describe_tasks()
        assert not any("test_a_task_is_described" in d for d in describe_tasks())  # the caller
    finally:
        event.set()
        await task
    assert describe(task) == "the-task: coroutine"  # finished: nothing awaited any more


async def test_a_stop_that_outlives_the_drain_logs_what_it_waits_on(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hung = asyncio.Event()
    upstream = await start_app(hung_app(hung))
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": upstream, "timeout_seconds": 600}},
            [{"name": "r", "match": {"path_prefix": "/"}, "champion": "one"}],
            server={"drain_timeout_seconds": 1.0},
        )
    )
    # The report is due 0.3 s into stopping, while the hung request still holds the drain.
    monkeypatch.setattr(app_module, "STOP_GRACE_SECONDS", -0.7)
    pending = asyncio.create_task(http.get(proxy_url(gateway, "/hang")))
    await asyncio.wait_for(hung.wait(), 5)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        await gateway.stop()
    reports = [r.getMessage() for r in caplog.records if "stopping has taken" in r.getMessage()]
    assert len(reports) == 1
    assert "forward (forward.py:" in reports[0]  # the request the drain waits for
    with pytest.raises(aiohttp.ClientError):
        await pending
