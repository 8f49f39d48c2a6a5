"""The one owner of each route's live state: its challenger weight, and from it the split
threshold the proxy reads.

Whatever changes a route at runtime changes it through ``Steering``: the config file (at
start and on every reload), the admin API, and the state store (a change that another
replica or worker made). The rules are written here once:

- a weight is valid as ``gateway.core.split.weight_problem`` says (the config's own
  validation uses the same function);
- **the file wins when it changes**: a weight set at runtime is kept together with the
  file's value it overrode, and applies only while the file still says that value. Edit
  the weight in the file and reload (or restart), and the file's value takes over; the
  runtime value is forgotten for good, so reverting the file later does not bring it
  back.

Runtime weights are stored in the state store under ``routes/{name}/weight`` as
``{"challenger_weight", "config_weight", "updated_at", "actor"}``, so a restart keeps
them and every replica follows them (within a second: the store's revision is polled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.core.split import threshold, weight_problem
from gateway.metrics import Metrics
from gateway.runtime import RouteRuntime
from gateway.store import StateStore, StoreError, watch_revisions

log = logging.getLogger("gateway.steering")

PREFIX = "routes/"


def weight_key(route: str) -> str:
    return f"{PREFIX}{route}/weight"


class SteeringError(Exception):
    """A change the rules refuse; ``status`` and ``code`` are for the admin API."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Override:
    """A weight set at runtime, with the file's weight it overrode."""

    weight: float
    config_weight: float

    def superseded_by(self, config_weight: float) -> bool:
        """Whether the file's weight changed since: then the file wins."""
        return self.config_weight != config_weight

    def applies_to(self, route: RouteRuntime) -> bool:
        return (
            not self.superseded_by(route.config.split.challenger_weight)
            and weight_problem(self.weight, route.has_challenger) is None
        )

    def record(self, actor: str) -> dict[str, Any]:
        return {
            "challenger_weight": self.weight,
            "config_weight": self.config_weight,
            "updated_at": time.time(),
            "actor": actor,
        }

    @classmethod
    def from_record(cls, value: Mapping[str, Any]) -> Override | None:
        """The override a stored record holds, or None if it holds no valid one."""
        weight, config_weight = value.get("challenger_weight"), value.get("config_weight")
        if not isinstance(weight, int | float) or weight_problem(weight) is not None:
            return None
        if not isinstance(config_weight, int | float) or isinstance(config_weight, bool):
            # No file value to hold on to: any file supersedes it (NaN equals nothing).
            config_weight = math.nan
        return cls(float(weight), float(config_weight))


class Steering:
    """Live weights of the current routes; see the module's docstring for the rules."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._routes: dict[str, RouteRuntime] = {}
        self._overrides: dict[str, Override] = {}
        self._store: StateStore | None = None

    @property
    def routes(self) -> Mapping[str, RouteRuntime]:
        return self._routes

    def adopt(self, routes: Mapping[str, RouteRuntime]) -> None:
        """Take over the routes of a config just loaded (at start, or by a reload): each
        gets its runtime weight where the file left the value it overrode, the file's
        weight otherwise."""
        self._routes = dict(routes)
        for name in [n for n in self._overrides if n not in routes]:
            del self._overrides[name]
        for name, route in routes.items():
            override = self._overrides.get(name)
            if override is not None and not override.applies_to(route):
                del self._overrides[name]
                override = None
                log.info("route %s: the file's weight changed, it wins", name)
            self._apply(
                route, override.weight if override else route.config.split.challenger_weight
            )

    async def set_weight(
        self, name: str, weight: object, *, actor: str = "admin"
    ) -> tuple[RouteRuntime, bool]:
        """Apply a weight at once, then store it; returns the route and whether the store
        took it. Applied either way: a rollback must work while the store is down."""
        route = self._routes.get(name)
        if route is None:
            raise SteeringError(404, "unknown_route", f"no route named {name!r}")
        problem = weight_problem(weight)
        if problem is not None:
            raise SteeringError(400, "bad_weight", f"challenger_weight {problem}")
        if weight_problem(weight, route.has_challenger) is not None:
            raise SteeringError(409, "no_challenger", f"route {name!r} has no challenger")
        assert isinstance(weight, int | float)
        override = Override(float(weight), route.config.split.challenger_weight)
        self._overrides[name] = override
        self._apply(route, override.weight)
        log.info("route %s: challenger weight set to %g by %s", name, override.weight, actor)
        return route, await self._save(name, override, actor)

    def _apply(self, route: RouteRuntime, weight: float) -> None:
        route.weight = weight
        route.threshold = threshold(weight)
        self._metrics.challenger_weight.labels(route.name).set(weight)

    # --- the state store ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def synced(self, store: StateStore) -> AsyncIterator[None]:
        """Keep runtime weights in ``store`` and follow its changes while in the block."""
        self._store = store
        try:
            await self.restore()
        except StoreError as error:
            # Serving with the file's weights beats not serving: the watcher retries.
            log.warning("state store unavailable at start, using configured weights: %s", error)
        follower = asyncio.create_task(self._follow(), name="steering-sync")
        try:
            yield
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            self._store = None

    async def _save(self, name: str, override: Override, actor: str) -> bool:
        if self._store is None:
            return False
        try:
            await self._store.put(weight_key(name), override.record(actor))
        except StoreError as error:
            log.warning("route %s: weight not persisted: %s", name, error)
            return False
        return True

    async def restore(self) -> int:
        """Apply the stored weights; returns how many routes changed. Records the file has
        overruled since are deleted, so a later revert of the file cannot revive them."""
        if self._store is None:
            return 0
        changed = 0
        for entry in await self._store.scan_prefix(PREFIX):
            name = entry.key[len(PREFIX) :].removesuffix("/weight")
            route = self._routes.get(name)
            override = Override.from_record(entry.value)
            if route is None or override is None:
                continue  # another config's route, or not a record this gateway wrote
            if override.superseded_by(route.config.split.challenger_weight):
                await self._store.delete(entry.key)
                continue
            if not override.applies_to(route):
                continue
            self._overrides[name] = override
            if override.weight != route.weight:
                self._apply(route, override.weight)
                changed += 1
                log.info(
                    "route %s: challenger weight %g from the state store", name, override.weight
                )
        return changed

    async def _follow(self) -> None:
        assert self._store is not None
        async for _ in watch_revisions(self._store):
            try:
                await self.restore()
            except StoreError as error:
                log.warning("cannot read weights from the state store: %s", error)
