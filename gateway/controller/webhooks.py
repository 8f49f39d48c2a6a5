"""Canary webhooks: events posted as JSON, gates asked before advancing.

A webhook never blocks the proxy and never hangs the controller: every call has its
own timeout, event posts run in the background, and each call is counted in
``gateway_canary_webhook_calls_total{route, event, outcome}`` (ok, refused, error,
timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from gateway.config import WebhookConfig
from gateway.metrics import Metrics

log = logging.getLogger("gateway.controller.webhooks")


class Webhooks:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        """Let posts under way finish (each is bounded by its timeout), then close."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def notify(self, hooks: Sequence[WebhookConfig], payload: dict[str, Any]) -> None:
        """Post ``payload`` to every webhook that wants its event, in the background."""
        event = payload["event"]
        for hook in hooks:
            if event in hook.events:
                task = asyncio.create_task(self._call(hook, payload))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def gate(self, hooks: Sequence[WebhookConfig], payload: dict[str, Any]) -> bool:
        """Whether every gate says go (a 2xx within its timeout)."""
        gates = [hook for hook in hooks if hook.gate]
        if not gates:
            return True
        answers = await asyncio.gather(*(self._call(hook, payload) for hook in gates))
        return all(answers)

    async def _call(self, hook: WebhookConfig, payload: dict[str, Any]) -> bool:
        route, event = str(payload["route"]), str(payload["event"])
        outcome = "error"
        try:
            if self._session is None:
                raise RuntimeError("webhooks are not open")
            timeout = aiohttp.ClientTimeout(total=hook.timeout_seconds)
            async with self._session.post(hook.url, json=payload, timeout=timeout) as response:
                await response.read()
                outcome = "ok" if 200 <= response.status < 300 else "refused"
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, OSError, RuntimeError) as error:
            log.warning("canary webhook %s for route %s: %s", hook.url, route, error)
        self._metrics.canary_webhook_calls.labels(route, event, outcome).inc()
        return outcome == "ok"
