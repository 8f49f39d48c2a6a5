"""Helpers for building test configs and URLs."""

from __future__ import annotations

from typing import Any

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
