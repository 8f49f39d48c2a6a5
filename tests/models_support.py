"""Shared by the model registry's end-to-end tests: a config whose route names the
registry, and small admin API calls."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.app import Gateway


def models_document(
    backends: dict[str, str], *, state: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    """A gateway on free loopback ports with one route, ``r`` at ``/``, whose champion
    and challenger are ``model:iris@champion`` and ``model:iris@challenger`` unless
    ``route`` says otherwise."""
    return {
        **({"state": state} if state is not None else {}),
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "tracing": {"enabled": False},
        "backends": {name: {"url": url} for name, url in backends.items()},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "champion": "model:iris@champion",
                "challenger": "model:iris@challenger",
                **route,
            }
        ],
    }


def admin(gateway: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gateway.admin_port}/api/v1{path}"


def proxy(gateway: Gateway, path: str = "/infer") -> str:
    return f"http://127.0.0.1:{gateway.proxy_port}{path}"


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def served_by(http: aiohttp.ClientSession, gateway: Gateway, key: str = "k") -> str:
    """Which upstream (``named_app``) answered a request, or the error code."""
    async with http.get(proxy(gateway), headers={"X-Request-ID": key}) as response:
        data = await response.json()
    return str(data.get("backend") or data["error"]["code"])
