"""What a new user meets in their first hour, each as they would meet it: ``make demo`` on
other ports, the demo banner's commands, the demo's argument errors, ``--help``, ``gateway
check``'s summary, the Dockerfile, the README's examples, and the size of ``/metrics``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import build_parser
from tests.cli_support import ROOT, cli_env, run_cli_sync
from tests.conftest import StartGateway
from tests.helpers.ports import free_port
from tests.support import admin_url, gateway_document, proxy_url

README = ROOT / "README.md"
# A PATH without the virtual environment's bin directory, as after `make install` in a
# shell where the venv is not activated.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- make demo: its ports, and the commands its banner prints ----------------------------


def make_demo_command(*variables: str) -> list[str]:
    """The command ``make demo VARIABLES`` runs, as make prints it (``-n``: nothing runs,
    nothing is installed)."""
    done = subprocess.run(
        ["make", "-n", "demo", *variables],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if " demo " in f"{line} "]
    assert lines, done.stdout
    return shlex.split(lines[-1])


async def read_whole_banner(stream: asyncio.StreamReader, within: float) -> list[str]:
    """The demo's banner, up to its last line (the canary rollback command)."""
    deadline = time.monotonic() + within
    lines: list[str] = []
    while not (lines and "canary rollback" in lines[-1]):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no whole banner within {within}s: {lines}"
        line = await asyncio.wait_for(stream.readline(), remaining)
        assert line, f"the demo closed stdout before its banner ended: {lines}"
        lines.append(line.decode().rstrip("\n"))
    return lines


async def test_make_demo_takes_ports_and_its_banner_commands_run_as_printed(
    http: aiohttp.ClientSession,
) -> None:
    port, admin_port = free_port(), free_port()
    command = make_demo_command(f"PORT={port}", f"ADMIN_PORT={admin_port}", "ARGS=--load 0")
    assert command[0] == ".venv/bin/gateway", command
    assert command[1:] == ["demo", "--port", str(port), "--admin-port", str(admin_port),
                           "--load", "0"]  # fmt: skip
    # Run what make would run, in a shell whose PATH does not have the venv on it.
    env = cli_env(PATH=SYSTEM_PATH)
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = await read_whole_banner(proc.stdout, within=20)
        text = "\n".join(banner)
        assert f"http://127.0.0.1:{port}" in text and f"http://127.0.0.1:{admin_port}" in text
        # Every gateway command the banner suggests starts with something this shell runs.
        commands = [line.strip() for line in banner if "gateway " in line and "--admin" in line]
        assert len(commands) >= 4, text
        assert all(c.startswith(".venv/bin/gateway ") for c in commands), commands
        status = next(c for c in commands if " status " in c and "canary" not in c)
        done = await asyncio.to_thread(
            subprocess.run, shlex.split(status), cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[:2] == ["ROUTE", "CHAMPION"]
        assert "sentiment" in done.stdout
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), 15)


def test_banner_names_gateway_alone_where_path_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.demo import gateway_command

    venv_bin = (ROOT / ".venv" / "bin").as_posix()
    monkeypatch.setenv("PATH", f"{venv_bin}:{SYSTEM_PATH}")
    monkeypatch.setattr("sys.executable", f"{venv_bin}/python")
    assert gateway_command() == "gateway"
    monkeypatch.setenv("PATH", SYSTEM_PATH)
    monkeypatch.chdir(ROOT)
    assert gateway_command() == ".venv/bin/gateway"
    monkeypatch.chdir("/")
    assert gateway_command() == f"{venv_bin}/gateway"


# --- gateway demo: bad arguments are argparse errors ---------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--weight", "1.5"], "argument --weight: must be between 0 and 1, got 1.5"),
        (["--error-rate", "7"], "argument --error-rate: must be between 0 and 1, got 7"),
        (["--error-rate", "nan"], "argument --error-rate: not a finite number: 'nan'"),
        (["--port", "80000"], "argument --port: a port is from 1 to 65535"),
        (["--admin-port", "-1"], "argument --admin-port: a port is from 1 to 65535"),
        (["--port", "http"], "argument --port: not a number: 'http'"),
        (["--load", "-5"], "argument --load: must be 0 or more, got -5"),
        (["--port", "18080", "--admin-port", "18080"],
         "--port and --admin-port are both 18080: give them different ports"),
    ],
)  # fmt: skip
def test_bad_demo_arguments_are_usage_errors(arguments: list[str], message: str) -> None:
    result = run_cli_sync("demo", *arguments, timeout=30)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    assert result.stderr.startswith("usage: gateway demo"), result.describe()
    assert f"gateway demo: error: {message}" in result.stderr, result.describe()


# --- --help --------------------------------------------------------------------------------


def all_parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The ``gateway`` parser and every subcommand's, by their command line."""
    todo = [("gateway", build_parser())]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend((f"{name} {n}", p) for n, p in action.choices.items())


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{name}: {', '.join(action.option_strings) or action.dest}"
        for name, parser in all_parsers()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []
    commands = [name for name, _ in all_parsers()]
    assert len(commands) >= 13, commands  # gateway, 6 commands, 6 canary verbs


def test_help_has_no_markup_and_every_command_a_description() -> None:
    for name, parser in all_parsers():
        text = parser.format_help()
        for markup in ("``", ":class:", ":func:", ".. ", "**"):
            assert markup not in text, f"{name} --help shows {markup!r}:\n{text}"
        assert parser.description, f"{name} --help has no description"


def test_help_as_the_shell_prints_it() -> None:
    result = run_cli_sync("demo", "--help")
    assert result.returncode == 0, result.describe()
    for option in ("--port", "--admin-port", "--weight", "--error-rate", "--load"):
        assert re.search(rf"^  {option} ", result.stdout, re.MULTILINE), result.stdout
    assert "``" not in result.stdout
    assert "default 8080" in result.stdout and "default 9090" in result.stdout


# --- gateway check and the start-up log: "1 route" -----------------------------------------


def test_check_counts_in_words(tmp_path: Path) -> None:
    result = run_cli_sync("check", "-c", "config/minimal.yaml")
    assert result.stdout.strip() == "config/minimal.yaml: ok (2 backends, 1 route)"
    one_backend = tmp_path / "one.yaml"
    one_backend.write_text(
        "backends: {m: {url: 'http://127.0.0.1:8001'}}\n"
        "routes:\n"
        "  - {name: a, match: {path_prefix: /a}, champion: m}\n"
        "  - {name: b, match: {path_prefix: /b}, champion: m}\n"
    )
    result = run_cli_sync("check", "-c", str(one_backend))
    assert result.stdout.strip() == f"{one_backend}: ok (1 backend, 2 routes)", result.describe()


async def test_start_up_log_counts_in_words(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    document = gateway_document(
        {"m": {"url": "http://127.0.0.1:9"}},
        [{"name": "a", "match": {"path_prefix": "/a"}, "champion": "m"}],
    )
    with caplog.at_level(logging.INFO, logger="gateway"):
        await start_gateway(document)
    started = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert len(started) == 1 and started[0].endswith(", 1 route"), started


# --- /metrics: no *_created series ---------------------------------------------------------


async def test_metrics_have_no_created_series(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    document = gateway_document(
        {"m": {"url": "http://127.0.0.1:9"}},
        [{"name": "a", "match": {"path_prefix": "/a"}, "champion": "m"}],
    )
    gateway = await start_gateway(document)
    async with http.get(proxy_url(gateway, "/nowhere")) as r:  # a 404: counted, unrouted
        assert r.status == 404
    async with http.get(admin_url(gateway, "/metrics")) as r:
        text = await r.text()
    assert 'gateway_requests_total{code="404",route="",variant=""} 1.0' in text
    assert "gateway_request_duration_seconds_count" in text
    assert "_created" not in text
