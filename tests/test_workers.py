"""``gateway run --workers 2``: both workers serve, metrics add up across them."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import SYNC_SECONDS
from tests.conftest import StartApp
from tests.helpers.apps import named_app
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.support import gateway_document, spawn_gateway


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_requests":
            for sample in family.samples:
                if sample.name == "gateway_requests_total":
                    labels = sample.labels
                    counts[(labels["route"], labels["variant"], labels["code"])] = sample.value
    return counts


@pytest.mark.timeout(60)
async def test_two_workers_serve_and_metrics_add_up(start_app: StartApp, tmp_path: Path) -> None:
    one, two = await start_app(named_app("one")), await start_app(named_app("two"))
    port, admin_port = free_port(), free_port()
    document = gateway_document(
        {"one": {"url": one}, "two": {"url": two}},
        [{"name": "r", "match": {"path_prefix": "/"}, "champion": "one", "challenger": "two"}],
        server={"port": port},
        admin={"port": admin_port},
        state={"path": str(tmp_path / "state.db")},
        tracing={"enabled": False},
    )
    process = await spawn_gateway(document, tmp_path, "--workers", "2")
    proxy, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        # A fresh connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            ready = Streak(10)  # ten answers in a row: both workers are up

            async def both_up() -> bool:
                try:
                    async with session.get(f"{admin}/readyz") as response:
                        return ready.add(response.status == 200)
                except aiohttp.ClientConnectionError:
                    return ready.add(False)

            await wait_until(both_up, "both workers ready", within=20, every=0.02)

            for i in range(200):
                async with session.post(f"{proxy}/p", headers={"X-Request-ID": f"w-{i}"}) as r:
                    assert r.status == 200
                    assert (await r.json())["backend"] == "one"
            # Each worker moves its counts into the shared files at least every
            # SYNC_SECONDS; after that every scrape, whichever worker answers it, sees
            # exactly all 200.
            expected = {("r", "champion", "200"): 200.0}

            async def counts() -> dict[tuple[str, str, str], float]:
                async with session.get(f"{admin}/metrics") as response:
                    return requests_total(await response.text())

            async def added_up() -> bool:
                return await counts() == expected

            await wait_until(added_up, f"scrapes adding up to {expected}",
                             within=5 * SYNC_SECONDS, every=0.05)  # fmt: skip
            for _ in range(6):
                assert await counts() == expected

            # A weight set through one worker reaches the other through the state store.
            async with session.put(
                f"{admin}/api/v1/routes/r/weight", json={"challenger_weight": 1.0}
            ) as response:
                assert response.status == 200
            streak = Streak(20)

            async def all_to_two() -> bool:
                async with session.post(f"{proxy}/p") as r:
                    return streak.add((await r.json())["backend"] == "two")

            await wait_until(all_to_two, "20 answers in a row from the challenger", every=0)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=20)
        output = (await process.stdout.read()).decode() if process.stdout else ""
        assert code == 0, output
        assert "Traceback" not in output
        assert output.count("gateway listening") == 2, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Streak:
    """Counts outcomes in a row: ``add`` says whether the last ``length`` were all good."""

    def __init__(self, length: int) -> None:
        self.length, self.count = length, 0

    def add(self, good: bool) -> bool:
        self.count = self.count + 1 if good else 0
        return self.count >= self.length


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_workers_stop_when_the_supervisor_is_killed(
    start_app: StartApp, tmp_path: Path
) -> None:
    """SIGKILL reaches only the supervisor; its workers must not serve on, unsupervised."""
    one = await start_app(named_app("one"))
    port = free_port()
    document = gateway_document(
        {"one": {"url": one}},
        [{"name": "r", "match": {"path_prefix": "/"}, "champion": "one"}],
        server={"port": port},
        admin={"port": free_port()},
        state={"path": str(tmp_path / "state.db")},
        tracing={"enabled": False},
    )
    process = await spawn_gateway(document, tmp_path, "--workers", "2")
    workers: list[int] = []
    output: list[str] = []
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            while not workers:
                line = (await process.stdout.readline()).decode()
                assert line, f"the supervisor exited before starting its workers: {output}"
                output.append(line)
                if "started 2 workers:" in line:
                    workers = [int(pid) for pid in line.rsplit(":", 1)[1].split(",")]
        assert all(running(pid) for pid in workers)
        process.kill()
        # Not process.wait(): before Python 3.12 it also waits for the output pipe,
        # which the workers hold open until they exit.
        await wait_until(
            lambda: not any(running(pid) for pid in workers),
            "the orphaned workers to exit",
            within=15,
            every=0.1,
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
