"""Challenger weights set at runtime, kept in the state store.

A weight set through the admin API is stored with the config weight it overrode. On start
and whenever the store changes (another replica set a weight), stored weights are applied
to the routes whose config weight is still the one they overrode: editing a route's
weight in the file and restarting or reloading makes the file win, as an operator expects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.runtime import RouteRuntime
from gateway.store import StateStore, StoreError, watch_revisions

log = logging.getLogger("gateway.weights")

PREFIX = "routes/"


def weight_key(route: str) -> str:
    return f"{PREFIX}{route}/weight"


def stored_weight(route: RouteRuntime, value: Mapping[str, Any]) -> float | None:
    """The stored weight to apply to ``route``, or None if the record is not a valid one.
    (Whether it is stale, its config weight changed since, is restore()'s question.)"""
    weight = value.get("challenger_weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return None
    if not 0.0 <= weight <= 1.0:
        return None
    if route.challenger is None and weight > 0:
        return None
    return float(weight)


class WeightSync:
    def __init__(self, store: StateStore, routes: Callable[[], Mapping[str, RouteRuntime]]) -> None:
        self.store = store
        self._routes = routes
        self._task: asyncio.Task[None] | None = None

    async def save(self, route: RouteRuntime) -> bool:
        """Store the route's current weight; False when the store is unavailable."""
        record = {
            "challenger_weight": route.weight,
            "config_weight": route.config.split.challenger_weight,
            "updated_at": time.time(),
        }
        try:
            await self.store.put(weight_key(route.name), record)
        except StoreError as error:
            log.warning("route %s: weight not persisted: %s", route.name, error)
            return False
        return True

    async def restore(self) -> int:
        """Apply stored weights; returns how many routes changed."""
        entries = await self.store.scan_prefix(PREFIX)
        routes = self._routes()
        changed = 0
        for entry in entries:
            name = entry.key[len(PREFIX) :].removesuffix("/weight")
            route = routes.get(name)
            if route is None:
                continue
            if entry.value.get("config_weight") != route.config.split.challenger_weight:
                # The file's weight changed since this was stored: the file won, and the
                # record must not come back if the file is later reverted.
                await self.store.delete(entry.key)
                continue
            weight = stored_weight(route, entry.value)
            if weight is not None and weight != route.weight:
                route.set_weight(weight)
                changed += 1
                log.info("route %s: challenger weight %g from the state store", name, weight)
        return changed

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="weight-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _follow(self) -> None:
        async for _ in watch_revisions(self.store):
            try:
                await self.restore()
            except StoreError as error:
                log.warning("cannot read weights from the state store: %s", error)
