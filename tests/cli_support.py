"""Running the ``gateway`` command as a real subprocess, as an operator would, or in the
test's process through ``main``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = (sys.executable, "-m", "gateway.cli")
T = TypeVar("T")


def cli_env(**extra: str) -> dict[str, str]:
    """The current environment without any GATEWAY_* variable (token, admin URL, test
    variables a broken config relies on being unset), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


def run_cli_sync(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> CliResult:
    """For tests with no event loop of their own to keep serving."""
    done = subprocess.run(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=cli_env() if env is None else env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    return CliResult(done.returncode, done.stdout.decode(), done.stderr.decode())


async def run_cli(*args: str, env: dict[str, str] | None = None, within: float = 20.0) -> CliResult:
    """Run the CLI without blocking the loop, so an in-process gateway keeps answering it."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env() if env is None else env,
        cwd=ROOT,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"gateway {' '.join(args)} did not finish within {within}s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, stdout.decode(), stderr.decode())


async def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """``gateway ARGS`` in this process, as ``main`` runs it, with what it printed (captured
    by ``capsys``). It runs in a thread: it blocks on the admin API of a gateway that the
    test's own event loop serves. An uncaught ``SystemExit`` ends it as it would end the
    process: its message on stderr and exit code 1 (or its code, argparse's 2)."""
    from gateway.cli import main

    capsys.readouterr()  # what came before is not this command's

    def call() -> int:
        try:
            return main(list(args))
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                return exit.code or 0
            print(exit.code, file=sys.stderr)
            return 1

    code = await asyncio.to_thread(call)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
