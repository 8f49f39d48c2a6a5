"""``gateway canary``: status (every canary in a line, one in full, JSON, a live watch) and
the operator's commands, against a real gateway with a fast canary and real traffic."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import termios
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from tests.canary_support import canary, reaches, traffic
from tests.cli_support import CLI, ROOT, CliResult, cli_env, run_main
from tests.conftest import StartApp, StartGateway
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, named_app

pytestmark = pytest.mark.timeout(60)

TOKEN = "canary-s3cret"
CANARY = {
    "steps": [0.5, 1.0],
    "step_interval_seconds": 0.5,
    "evaluation_interval_seconds": 0.2,
    "min_requests": 5,
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A variant's counts in the detailed view: requests, failures, rate [its bounds].
COUNTS = r"\d+, \d+ failed, \d+\.\d\d% \[\d+\.\d\d%, \d+\.\d\d%\]"


async def start_canary_gateway(
    start_gateway: StartGateway, start_app: StartApp, token: str = ""
) -> Gateway:
    """``sentiment`` with a canary of two half-second steps; ``plain`` without one."""
    v1, v2 = await start_app(named_app("v1")), await start_app(named_app("v2"))
    document = gateway_document(
        {"v1": {"url": v1}, "v2": {"url": v2}},
        [
            {
                "name": "plain",
                "match": {"path_prefix": "/plain"},
                "champion": "v1",
                "challenger": "v2",
            },
            {
                "name": "sentiment",
                "match": {"path_prefix": "/sentiment"},
                "champion": "v1",
                "challenger": "v2",
                "canary": CANARY,
            },
        ],
        admin={"token": token},
        tracing={"enabled": False},
    )
    return await start_gateway(document)


async def canary_view(http: aiohttp.ClientSession, gateway: Gateway) -> Any:
    return await canary(http, gateway, "sentiment")


async def reaches_state(http: aiohttp.ClientSession, gateway: Gateway, state: str) -> Any:
    return await reaches(http, gateway, state, within=15, route="sentiment")


def assert_refused(result: CliResult, *fragments: str) -> None:
    """Exit 1, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.output, result.describe()
    assert result.stdout == "", result.describe()
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.describe()}"


def assert_idle(gateway: Gateway) -> None:
    status = gateway.controller.status("sentiment")
    assert status is not None and status.state == "idle", status


def rows(result: CliResult) -> list[list[str]]:
    assert result.returncode == 0, result.describe()
    return [line.split() for line in result.stdout.splitlines() if line.strip()]


def without_clock(view: dict[str, Any]) -> dict[str, Any]:
    """A view without what changes by the second alone."""
    return {k: v for k, v in view.items() if k not in ("step_elapsed", "next_evaluation_in")}


async def test_status_lists_the_routes_with_a_canary(
    start_gateway: StartGateway, start_app: StartApp, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_canary_gateway(start_gateway, start_app)
    admin = admin_url(gateway)
    idle = await run_main(capsys, "canary", "status", "--admin", admin)
    assert rows(idle) == [
        ["ROUTE", "STATE", "STEP", "WEIGHT", "REASON"],
        ["sentiment", "idle", "-", "of", "2", "0", "-"],  # `plain` has no canary
    ]
    as_json = await run_main(capsys, "canary", "status", "--admin", admin, "--json")
    assert as_json.returncode == 0, as_json.describe()
    canaries = json.loads(as_json.stdout)["canaries"]
    assert [c["route"] for c in canaries] == ["sentiment"]
    assert canaries[0]["state"] == "idle"
    assert canaries[0]["steps"] == [0.5, 1.0]


async def test_start_status_pause_resume_rollback(
    start_gateway: StartGateway,
    start_app: StartApp,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await start_canary_gateway(start_gateway, start_app)
    admin = admin_url(gateway)

    started = await run_main(capsys, "canary", "start", "sentiment", "--admin", admin)
    assert started.returncode == 0, started.describe()
    assert started.stdout == "sentiment: progressing, step 1 of 2, weight 0.5 (started)\n"
    assert gateway.routes["sentiment"].weight == 0.5

    async with traffic(http, gateway, path="/sentiment") as statuses:

        async def decided_on_both_variants() -> Any:
            view = await canary_view(http, gateway)
            decision = view["last_decision"] or {}
            step = view["counts"]["step"]
            counted = all(step[v]["requests"] > 0 for v in ("champion", "challenger"))
            return view if decision.get("checks") and counted else None

        await wait_until(
        decided_on_both_variants, "a decision on requests to both variants", within=10
    )
        paused = await run_main(capsys, "canary", "pause", "sentiment", "--admin", admin)
    assert paused.returncode == 0, paused.describe()
    assert re.fullmatch(
        r"sentiment: paused, step [12] of 2, weight (0\.5|1) \(operator\)\n", paused.stdout
    )
    assert statuses and set(statuses) == {200}

    # No more traffic and no more decisions: once the last counts are flushed (every
    # 0.2 s), the view stands still but for its clocks.
    last: list[Any] = [None]

    async def settled() -> Any:
        view = without_clock(await canary_view(http, gateway))
        still = view == last[0]
        last[0] = view
        return view if still else None

    view = await wait_until(
        settled, "the paused canary's counts to settle", within=10, every=0.3
    )
    step = view["step"] + 1

    detail = await run_main(capsys, "canary", "status", "sentiment", "--admin", admin)
    assert detail.returncode == 0, detail.describe()
    text = detail.stdout
    weight = f"{view['weight']:g}"
    assert (
        text.splitlines()[0] == f"sentiment  paused  step {step} of 2  weight {weight}  (operator)"
    )
    assert ("[0.5] > 1" if step == 1 else "0.5 > [1]") in text
    for label, key in (("this step", "step"), ("whole canary", "canary")):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        cells = re.findall(COUNTS, line)
        assert len(cells) == 2, line
        for cell, variant in zip(cells, ("champion", "challenger"), strict=True):
            counts = view["counts"][key][variant]
            assert cell.startswith(f"{counts['requests']}, {counts['failures']} failed, "), line
    decision = view["last_decision"]
    # The last decision is still the controller's, with its checks (why it held or moved
    # before the pause); the operator's pause is the history's last entry.
    assert "last decision" in text and decision["action"] in ("hold", "advance")
    assert decision["checks"] and f"{decision['action']} ({decision['reason']})" in text
    history = [line.split() for line in text.split("history")[1].splitlines()[1:]]
    assert [h[1] for h in history][-1] == "pause"
    assert history[0][1] in ("start", "hold", "advance")
    for entry in view["history"][-len(history) :]:
        assert any(h[1] == entry["action"] and h[2] == entry["reason"] for h in history)

    as_json = await run_main(capsys, "canary", "status", "sentiment", "--json", "--admin", admin)
    assert as_json.returncode == 0, as_json.describe()
    assert without_clock(json.loads(as_json.stdout)) == view

    again = await run_main(capsys, "canary", "pause", "sentiment", "--admin", admin)
    assert_refused(again, "409", "cannot pause a canary that is paused", "/sentiment/canary/pause")

    resumed = await run_main(capsys, "canary", "resume", "sentiment", "--admin", admin)
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.stdout.startswith("sentiment: progressing, step ")
    async with traffic(http, gateway, path="/sentiment"):
        await reaches_state(http, gateway, "awaiting_promotion")
        evaluated = await run_main(capsys, "canary", "status", "sentiment", "--admin", admin)
        listed = await run_main(capsys, "canary", "status", "--admin", admin)
    assert rows(listed)[1] == [
        "sentiment",
        "awaiting_promotion",
        "2",
        "of",
        "2",
        "1",
        "last_step_passed",
    ]
    # The controller's last evaluation: every check it made, with its numbers.
    text = evaluated.stdout
    assert "advance (" in text
    for name in ("error_rate", "success_rate"):
        check = next(line for line in text.splitlines() if f" {name} " in line)
        assert check.split()[0] == "pass", check
        assert "estimate" in check and "limit" in check and "bound" in check
    assert "failure rate challenger" in text  # the error-rate check's own words

    rolled_back = await run_main(capsys, "canary", "rollback", "sentiment", "--admin", admin)
    assert rolled_back.returncode == 0, rolled_back.describe()
    assert rolled_back.stdout == "sentiment: rolled_back, step 2 of 2, weight 0 (operator)\n"
    assert gateway.routes["sentiment"].weight == 0.0
    refused = await run_main(capsys, "canary", "resume", "sentiment", "--admin", admin)
    assert_refused(refused, "409", "cannot resume a canary that is rolled_back")


async def test_refusals_are_one_line(
    start_gateway: StartGateway, start_app: StartApp, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_canary_gateway(start_gateway, start_app)
    admin = admin_url(gateway)
    idle_pause = await run_main(capsys, "canary", "pause", "sentiment", "--admin", admin)
    assert_refused(idle_pause, "409", "cannot pause a canary that is idle")
    no_canary = await run_main(capsys, "canary", "start", "plain", "--admin", admin)
    assert_refused(no_canary, "404", "route 'plain' has no canary configured")
    shown = await run_main(capsys, "canary", "status", "plain", "--admin", admin)
    assert_refused(shown, "404", "route 'plain' has no canary configured")
    unknown = await run_main(capsys, "canary", "promote", "nope", "--admin", admin)
    assert_refused(unknown, "404", "no route named 'nope'")
    closed = f"http://127.0.0.1:{free_port()}"
    for args in (("status",), ("status", "sentiment"), ("status", "--watch"), ("start", "x")):
        unreachable = await run_main(capsys, "canary", *args, "--admin", closed)
        assert_refused(unreachable, "cannot reach the admin API", closed)
    # Something else answering JSON at --admin is an operator's mistake, not a crash.
    other = await start_app(named_app("not-a-gateway"))
    for args in (("status",), ("status", "sentiment"), ("rollback", "sentiment")):
        confused = await run_main(capsys, "canary", *args, "--admin", other)
        assert_refused(confused, other, "did not answer like the gateway's admin API")
    # A command the parser does not know is argparse's usage error.
    unknown_verb = await run_main(capsys, "canary", "advance", "sentiment")
    assert unknown_verb.returncode == 2, unknown_verb.describe()
    assert_idle(gateway)


async def test_canary_commands_with_a_token(
    start_gateway: StartGateway, start_app: StartApp, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_canary_gateway(start_gateway, start_app, token=TOKEN)
    admin = admin_url(gateway)
    for args in (("status",), ("status", "sentiment"), ("start", "sentiment")):
        refused = await run_main(capsys, "canary", *args, "--admin", admin)
        assert_refused(refused, "401")
    assert_idle(gateway)
    started = await run_main(
        capsys, "canary", "start", "sentiment", "--admin", admin, "--token", TOKEN
    )
    assert started.stdout.startswith("sentiment: progressing"), started.describe()
    shown = await run_main(capsys, "canary", "status", "--admin", admin, "--token", TOKEN)
    assert rows(shown)[1][:2] == ["sentiment", "progressing"]


# --- --watch, as a process an operator stops with Ctrl-C ----------------------------------


async def stop_with_ctrl_c(proc: asyncio.subprocess.Process) -> bytes:
    """SIGINT, as Ctrl-C sends it; the process must end by itself. Returns its stderr."""
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    stderr = await asyncio.wait_for(proc.stderr.read(), 10)
    await asyncio.wait_for(proc.wait(), 10)
    return stderr


async def test_watch_piped_follows_the_canary_until_ctrl_c(
    start_gateway: StartGateway, start_app: StartApp, http: aiohttp.ClientSession
) -> None:
    """Piped, the watch prints a line whenever the canary moves: here from idle through
    its start to awaiting promotion. With --json, a JSON document per refresh."""
    gateway = await start_canary_gateway(start_gateway, start_app)
    admin = admin_url(gateway)
    lines = await asyncio.create_subprocess_exec(
        *CLI, "canary", "status", "sentiment", "--watch", "--admin", admin,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=ROOT,
    )  # fmt: skip
    documents = await asyncio.create_subprocess_exec(
        *CLI, "canary", "status", "--watch", "--json", "--admin", admin,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=ROOT,
    )  # fmt: skip
    seen: list[str] = []
    parsed: list[Any] = []
    try:
        assert lines.stdout is not None and documents.stdout is not None

        async def line_with(fragment: str) -> str:
            async def next_line() -> str | None:
                assert lines.stdout is not None
                line = (await asyncio.wait_for(lines.stdout.readline(), 15)).decode()
                assert line, f"the watch closed its output: {seen}"
                seen.append(line)
                return line if fragment in line else None

            return await wait_until(next_line, f"a line with {fragment!r}", within=15, every=0)

        assert "sentiment: idle, step - of 2, weight 0" in await line_with("sentiment:")
        async with traffic(http, gateway, path="/sentiment"):
            async with http.post(admin_url(gateway, "/api/v1/routes/sentiment/canary/start")) as r:
                assert r.status == 200, await r.text()
            # A refresh a second: the first step (half a second) may pass unseen.
            await line_with("sentiment: progressing, step ")
            await line_with("sentiment: awaiting_promotion, step 2 of 2, weight 1")

        for _ in range(2):  # two refreshes
            line = await asyncio.wait_for(documents.stdout.readline(), 15)
            parsed.append(json.loads(line))
        line_errors, document_errors = await asyncio.gather(
            stop_with_ctrl_c(lines), stop_with_ctrl_c(documents)
        )
    finally:
        for proc in (lines, documents):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert lines.returncode == 0, line_errors.decode()
    assert documents.returncode == 0, document_errors.decode()
    assert b"Traceback" not in line_errors + document_errors
    # A line per change, not per refresh: the idle canary was printed once.
    assert sum("idle" in line for line in seen) == 1, seen
    assert all(d["canaries"][0]["route"] == "sentiment" for d in parsed)


async def test_watch_in_a_terminal_redraws_until_ctrl_c(
    start_gateway: StartGateway, start_app: StartApp, http: aiohttp.ClientSession
) -> None:
    """In a terminal (a pseudo-terminal here), the watch is rich's live view of the
    detailed status, redrawn every second; Ctrl-C leaves it with exit code 0."""
    gateway = await start_canary_gateway(start_gateway, start_app)
    admin = admin_url(gateway)
    async with http.post(admin_url(gateway, "/api/v1/routes/sentiment/canary/start")) as r:
        assert r.status == 200, await r.text()
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    os.set_blocking(master, False)
    screen = bytearray()

    def read_screen() -> None:
        try:
            screen.extend(os.read(master, 65536))
        except OSError:  # the terminal's last process closed it
            loop.remove_reader(master)

    loop = asyncio.get_running_loop()
    loop.add_reader(master, read_screen)
    try:
        env = cli_env(TERM="xterm-256color", COLUMNS="200", LINES="60")
        proc = await asyncio.create_subprocess_exec(
            *CLI, "canary", "status", "sentiment", "--watch", "--admin", admin,
            stdin=asyncio.subprocess.DEVNULL, stdout=terminal,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        os.close(terminal)
        try:

            def shown() -> str:
                return ANSI.sub("", screen.decode(errors="replace"))

            async def redrawn(fragment: str) -> bool:
                text = shown()
                return text.count("Ctrl-C to stop") >= 2 and fragment in text

            async with traffic(http, gateway, path="/sentiment"):
                await wait_until(lambda: redrawn("sentiment  "), "a redrawn live view", within=15)
                await wait_until(
                    lambda: redrawn("sentiment  awaiting_promotion"),
                    "the view to follow the canary to its last step",
                    within=15,
                )
            stderr = await stop_with_ctrl_c(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        loop.remove_reader(master)
        os.close(master)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr + screen, stderr.decode()
    text = shown()
    assert "\x1b[" in screen.decode(errors="replace")  # drawn with a terminal's controls
    for fragment in ("step 2 of 2", "last decision", "error_rate", "this step", "history"):
        assert fragment in text, text[-2000:]
