"""Helpers for building test configs and URLs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from gateway.app import Gateway


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


def named_app(name: str) -> web.Application:
    """An upstream that answers every request with ``{"backend": name}``."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"backend": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


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
