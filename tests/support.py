"""Helpers for building test configs and URLs, and for gateways run as processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.app import Gateway
from tests.helpers.apps import named_app as named_app  # where tests/test_reload.py looks
from tests.helpers.waiting import wait_until


def gateway_document(
    backends: dict[str, Any], routes: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    """A config document listening on free loopback ports."""
    document: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_seconds": 10},
        "admin": {"host": "127.0.0.1", "port": 0},
        "backends": backends,
        "routes": routes,
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(document.get(name), dict):
            document[name] = {**document[name], **value}
        else:
            document[name] = value
    return document


def proxy_url(gateway: Gateway, path: str = "") -> str:
    return f"http://127.0.0.1:{gateway.proxy_port}{path}"


def admin_url(gateway: Gateway, path: str = "") -> str:
    return f"http://127.0.0.1:{gateway.admin_port}{path}"


async def spawn_gateway(
    document: dict[str, Any], directory: Path, *args: str, capture: bool = True
) -> asyncio.subprocess.Process:
    """``gateway run`` as a real process, on a config file written from ``document``."""
    config = directory / "gateway.yaml"
    config.write_text(yaml.safe_dump(document))
    output = asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "-c", str(config), *args,
        stdout=output, stderr=asyncio.subprocess.STDOUT if capture else output,
    )  # fmt: skip


def log_text(path: Path) -> str:
    """A gateway process's log, for a failure message."""
    return path.read_text(errors="replace")


async def wait_ready(
    http: aiohttp.ClientSession,
    admin: str,
    *,
    process: asyncio.subprocess.Process | None = None,
    log: Path | None = None,
    within: float = 15.0,
) -> None:
    """Wait until the admin listener at ``admin`` (a base URL) answers ``/readyz`` with
    200. With ``process``, fail at once if it exits first, showing ``log`` if given."""

    async def ready() -> bool:
        if process is not None and process.returncode is not None:
            shown = log_text(log) if log is not None else ""
            raise AssertionError(f"the gateway exited with {process.returncode}: {shown}")
        async with http.get(f"{admin}/readyz") as response:
            return response.status == 200

    await wait_until(
        ready,
        f"the gateway at {admin} to be ready",
        within=within,
        every=0.05,
        ignoring=(aiohttp.ClientConnectionError,),
    )
