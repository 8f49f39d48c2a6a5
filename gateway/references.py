"""Routes that name the registry (``model:iris@champion``): what each reference resolves
to, followed as the registry changes.

``References`` reads the registry only off the request path: at start, after a reload,
after a change this process made, and whenever the state store's revision moves (the
poll ``gateway.steering`` runs anyway, every 250 ms: no extra store call while nothing
changes, and an alias moved through any replica is followed within a second). It hands
the result to ``gateway.steering``, the one writer of the routes' live state, which
points the lanes at the new pools: the next request goes to the new version, those in
flight finish where they started (they hold their pool).

A version is served by a pool: the config's, when it names a ``backend``, or one built
for it from its ``url``/``endpoints``, made when a reference first resolves to it and
dropped once none does. A reference that points nowhere (no such model, alias or version)
resolves to a pool without endpoints whose 503 ``no_healthy_endpoint`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.config import BackendConfig
from gateway.core.reference import Reference, parse_reference
from gateway.metrics import Metrics
from gateway.registry import LATEST, Registry, Version
from gateway.runtime import Runtime
from gateway.store import StoreError
from gateway.upstream import BackendPool
from gateway.upstream.unresolved import unresolved_pool

if TYPE_CHECKING:
    from gateway.steering import Steering

log = logging.getLogger("gateway.references")

@dataclass(frozen=True, slots=True, eq=False)
class Resolution:
    """What one reference resolves to now: a version and the pool that serves it, or no
    version and a pool that answers 503 with ``problem``."""

    reference: str
    pool: BackendPool
    version: Version | None = None
    problem: str = ""

    def same_as(self, other: Resolution | None) -> bool:
        return (
            other is not None
            and other.pool is self.pool
            and other.version == self.version
            and other.problem == self.problem
        )

    def as_dict(self) -> dict[str, Any]:
        version = self.version
        return {
            "reference": self.reference,
            "version": version.version if version is not None else None,
            "served_by": self.pool.name if version is not None else None,
            "endpoints": [e.base for e in self.pool.endpoints],
            "trace_model": version.trace_model if version is not None else None,
            "problem": self.problem or None,
        }


# (model) -> its aliases and its versions by number, as last read.
Snapshot = dict[str, tuple[dict[str, int], dict[int, Version]]]


class References:
    """Resolves the current routes' registry references; see the module's docstring."""

    def __init__(
        self,
        steering: Steering,
        metrics: Metrics,
        *,
        on_challenger_moved: Callable[[str], None] | None = None,
    ) -> None:
        self._steering = steering
        self._metrics = metrics
        self._on_challenger_moved = on_challenger_moved
        self._references: dict[str, Reference] = {}
        self._pools: Mapping[str, BackendPool] = {}
        self._snapshot: Snapshot = {}
        # Pools built for versions served by URL, by (model, version): while referenced.
        self._own: dict[tuple[str, int], BackendPool] = {}
        self._gauged: set[tuple[str, str, str]] = set()
        self._registry: Registry | None = None
        self._refreshing = asyncio.Lock()
        self.resolutions: dict[str, Resolution] = {}

    @property
    def registry(self) -> Registry | None:
        return self._registry

    def adopt(self, runtime: Runtime) -> None:
        """The references of a config just loaded, resolved from what was last read
        (models not read yet are resolved at the next ``refresh``)."""
        found: dict[str, Reference] = {}
        for route in runtime.routes.values():
            config = route.config
            for name in (config.champion, config.challenger, config.shadow_target):
                if name is not None and name.startswith("model:") and name not in found:
                    found[name] = parse_reference(name)
        self._references, self._pools = found, runtime.pools
        self._apply()

    async def refresh(self) -> None:
        """Read the referenced models from the registry and apply what they resolve to."""
        registry = self._registry
        if registry is None:
            return
        async with self._refreshing:
            snapshot: Snapshot = {}
            for model in sorted({r.model for r in self._references.values()}):
                aliases = await registry.aliases(model)
                versions = {v.version: v for v in await registry.versions(model)}
                snapshot[model] = (aliases, versions)
            self._snapshot = snapshot
            self._apply()

    def _apply(self) -> None:
        resolutions: dict[str, Resolution] = {}
        used: set[tuple[str, int]] = set()
        for text, reference in self._references.items():
            read = self._snapshot.get(reference.model)
            if read is None:
                continue  # not read yet: the lane keeps what it has
            resolution = self._resolve(text, reference, *read)
            if resolution.version is not None and resolution.version.backend is None:
                used.add((reference.model, resolution.version.version))
            resolutions[text] = resolution
        for key in [k for k in self._own if k not in used]:
            del self._own[key]  # requests in flight hold it until they finish
        moved = [
            text for text, r in resolutions.items() if not r.same_as(self.resolutions.get(text))
        ]
        self.resolutions = resolutions
        for text in moved:
            r = resolutions[text]
            shown = f"version {r.version.version} ({r.pool.name})" if r.version else r.problem
            log.info("%s now resolves to %s", text, shown)
        changed = self._steering.resolved(resolutions)
        if self._on_challenger_moved is not None:
            for name in changed:
                self._on_challenger_moved(name)
        self._gauge()

    def _resolve(
        self, text: str, reference: Reference, aliases: dict[str, int], versions: dict[int, Version]
    ) -> Resolution:
        model, selector = reference.model, reference.selector
        if not versions:
            return self._nowhere(text, f"{text}: the registry has no model {model!r} (yet)")
        if reference.version is not None:
            number: int | None = reference.version
        elif selector == LATEST:
            number = max(versions)
        else:
            number = aliases.get(selector)
            if number is None:
                return self._nowhere(
                    text, f"{text}: alias {selector!r} of model {model!r} points at no version"
                )
        version = versions.get(number) if number is not None else None
        if version is None:
            return self._nowhere(text, f"{text}: model {model!r} has no version {number}")
        if version.backend is not None:
            pool = self._pools.get(version.backend)
            if pool is None:
                return self._nowhere(
                    text,
                    f"{text}: version {version.version} is served by backend "
                    f"{version.backend!r}, which this gateway's config does not have",
                )
            return Resolution(text, pool, version)
        key = (model, version.version)
        pool = self._own.get(key)
        if pool is None or [e.base for e in pool.endpoints] != list(version.endpoints):
            pool = self._own[key] = BackendPool.from_config(
                f"model:{model}@{version.version}",
                BackendConfig(endpoints=list(version.endpoints), model=version.trace_model),
                on_ejection=self._metrics.endpoint_ejected,
            )
        return Resolution(text, pool, version)

    def _nowhere(self, text: str, problem: str) -> Resolution:
        kept = self.resolutions.get(text)
        if kept is not None and kept.version is None and kept.problem == problem:
            return kept  # the same pool: nothing to re-point
        return Resolution(text, unresolved_pool(text, problem), None, problem)

    def _gauge(self) -> None:
        """The info gauge of the followed models' aliases: 1 on each alias's version."""
        now = {
            (model, alias, str(version))
            for model, (aliases, _) in self._snapshot.items()
            for alias, version in aliases.items()
        }
        gauge = self._metrics.registry_alias_target
        for labels in self._gauged - now:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for labels in now:
            gauge.labels(*labels).set(1)
        self._gauged = now

    @contextlib.asynccontextmanager
    async def running(self, registry: Registry) -> AsyncIterator[None]:
        """Follow the registry while in the block: read now, and again whenever
        steering's watch of the store sees its revision move."""
        self._registry = registry
        self._steering.attach_registry(registry, self.refresh)
        try:
            await self.refresh()
        except StoreError as error:
            log.warning("cannot read the model registry at start: %s", error)
        try:
            yield
        finally:
            self._steering.attach_registry(None, None)
            self._registry = None
