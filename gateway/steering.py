"""The one owner of each route's live state: its challenger weight (and from it the split
threshold the proxy reads), and which backend plays champion and which challenger.

Whatever changes a route at runtime changes it through ``Steering``: the config file (at
start and on every reload), the admin API, the canary controller, and the state store (a
change that another replica or worker made). The rules are written here once:

- a weight is valid as ``gateway.core.split.weight_problem`` says (the config's own
  validation uses the same function);
- **the file wins when it changes**: a weight set at runtime is kept together with the
  file's value it overrode, and applies only while the file still says that value. A
  promotion (the challenger made champion) is kept with the file's champion and
  challenger in the same way. Edit the file and reload (or restart), and the file takes
  over; the runtime value is forgotten for good, so reverting the file later does not
  bring it back;
- while a canary drives a route's weight, nobody else may change it (409
  ``canary_active``): the controller holds the route's lock.

Runtime state is kept in the state store, so that a restart keeps it and every replica
follows it within a second (the store's revision is polled):
``routes/{name}/weight`` ``{"challenger_weight", "config_weight", "updated_at", "actor"}``
and ``routes/{name}/promotion`` ``{"champion", "previous", "config_champion",
"config_challenger", "updated_at", "actor"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.core.reference import is_reference, parse_reference, promotable
from gateway.core.refused import Refused
from gateway.core.split import threshold, weight_problem
from gateway.metrics import Metrics
from gateway.pipeline.rewrite import rewrite_for
from gateway.registry import Registry, RegistryError
from gateway.runtime import RouteRuntime, Runtime
from gateway.store import StateStore, StoreError
from gateway.store.base import DEFAULT_POLL_SECONDS
from gateway.upstream import BackendPool

if TYPE_CHECKING:
    from gateway.references import Resolution

log = logging.getLogger("gateway.steering")

PREFIX = "routes/"


def weight_key(route: str) -> str:
    return f"{PREFIX}{route}/weight"


def promotion_key(route: str) -> str:
    return f"{PREFIX}{route}/promotion"


class SteeringError(Refused):
    """A change of live route state the rules refuse."""


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


@dataclass(frozen=True, slots=True)
class Promotion:
    """A challenger made champion at runtime, with the file's pair it overrode."""

    champion: str  # the backend that now takes all traffic
    previous: str  # the champion it replaced: a rollback brings it back
    config_champion: str
    config_challenger: str | None

    def superseded_by(self, route: RouteRuntime) -> bool:
        config = route.config
        return (config.champion, config.challenger) != (
            self.config_champion,
            self.config_challenger,
        )

    def record(self, actor: str) -> dict[str, Any]:
        return {
            "champion": self.champion,
            "previous": self.previous,
            "config_champion": self.config_champion,
            "config_challenger": self.config_challenger,
            "updated_at": time.time(),
            "actor": actor,
        }

    @classmethod
    def from_record(cls, value: Mapping[str, Any]) -> Promotion | None:
        fields = [value.get(k) for k in ("champion", "previous", "config_champion")]
        challenger = value.get("config_challenger")
        if not all(isinstance(f, str) for f in fields) or not isinstance(challenger, str | None):
            return None
        champion, previous, config_champion = (str(f) for f in fields)
        return cls(champion, previous, config_champion, challenger)


class Steering:
    """Live state of the current routes; see the module's docstring for the rules."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._routes: dict[str, RouteRuntime] = {}
        self._pools: Mapping[str, BackendPool] = {}
        self._overrides: dict[str, Override] = {}
        self._promotions: dict[str, Promotion] = {}
        self._locks: dict[str, str] = {}  # route -> the actor that alone may set its weight
        self._actors: dict[str, str] = {}  # route -> who set its runtime weight
        self._store: StateStore | None = None
        # Changes made here, numbered: a restore whose read of the store began before a
        # route's last change here leaves that route alone (see restore).
        self._changes = 0
        self._changed: dict[str, int] = {}  # route -> the number of its last change here
        # Routes whose change made here is being written to the store right now: a read
        # of the store may come back from before that write lands (see restore).
        self._writing: dict[str, int] = {}  # route -> writes in flight
        # Records of changes made here that the store did not take (it was down): written
        # before anything is read from it again, so that it does not undo them.
        self._unsaved: dict[str, tuple[str, dict[str, Any] | None]] = {}  # key -> route, record
        # Set when a pass outside the follower failed (a reload's): the next poll applies
        # the store again even if its revision has not moved.
        self._stale = False
        # Registry references (gateway.references): what each resolves to now, the
        # registry a promotion moves aliases in, and how to re-resolve after it did.
        self._resolved: Mapping[str, Resolution] = {}
        self._registry: Registry | None = None
        self._reresolve: Callable[[], Awaitable[None]] | None = None

    @property
    def routes(self) -> Mapping[str, RouteRuntime]:
        return self._routes

    def resolution(self, reference: str) -> Resolution | None:
        """What a registry reference resolves to now (None: not read yet)."""
        return self._resolved.get(reference)

    def attach_registry(
        self, registry: Registry | None, reresolve: Callable[[], Awaitable[None]] | None
    ) -> None:
        self._registry, self._reresolve = registry, reresolve

    def resolved(self, resolutions: Mapping[str, Resolution]) -> list[str]:
        """Point the routes' registry references at what they resolve to now. Returns
        the routes whose challenger changed (a canary on it must start over)."""
        before, self._resolved = self._resolved, resolutions
        moved = {
            ref for ref, r in resolutions.items() if not r.same_as(before.get(ref))
        }
        if not moved:
            return []
        challengers_moved = []
        for name, route in self._routes.items():
            config = route.config
            if not moved.intersection((config.champion, config.challenger, config.shadow_target)):
                continue
            challenger = route.challenger
            self._apply_backends(route, self._promotions.get(name))
            self._reweigh(route)
            if route.challenger is not challenger and route.challenger is not None:
                challengers_moved.append(name)
        return challengers_moved

    def promotion(self, name: str) -> Promotion | None:
        return self._promotions.get(name)

    def adopt(self, runtime: Runtime) -> None:
        """Take over the routes of a config just loaded (at start, or by a reload): each
        keeps the runtime state the file has not overruled since, and takes the file's
        otherwise."""
        for _ in self._adopting(runtime):
            pass

    async def adopt_gradually(self, runtime: Runtime, batch: int = 500) -> None:
        """``adopt`` on a running event loop, pausing every ``batch`` new or changed routes
        so that requests keep flowing while thousands are adopted (20,000 took 0.1 s).
        The new ones serve only once the router is swapped after this; a change made
        meanwhile (a weight set, a store update) already goes to the new routes."""
        for adopted in self._adopting(runtime):
            if adopted % batch == 0:
                await asyncio.sleep(0)

    def _adopting(self, runtime: Runtime) -> Iterator[int]:
        """Adopt ``runtime``'s routes, yielding the count of those adopted so far."""
        previous = self._routes
        self._routes, self._pools = dict(runtime.routes), runtime.pools
        for kept in (self._overrides, self._promotions, self._locks, self._actors):
            for name in [n for n in kept if n not in self._routes]:
                del kept[name]
        adopted = 0
        for name, route in self._routes.items():
            if previous.get(name) is route:
                # Carried over as it was (gateway.runtime): neither its config nor its
                # pools changed, so nothing here would either.
                continue
            adopted += 1
            yield adopted
            promotion = self._promotions.get(name)
            if promotion is not None and promotion.superseded_by(route):
                del self._promotions[name]
                promotion = None
                log.info("route %s: the file's champion or challenger changed, it wins", name)
            self._apply_backends(route, promotion)
            override = self._overrides.get(name)
            if override is not None and not override.applies_to(route):
                del self._overrides[name]
                override = None
                log.info("route %s: the file's weight changed, it wins", name)
            self._apply(route, override.weight if override else self._file_weight(route))

    # --- changes ------------------------------------------------------------------------

    def lock(self, name: str, owner: str) -> None:
        """Only ``owner`` may set the route's weight until ``unlock``."""
        self._locks[name] = owner

    def unlock(self, name: str) -> None:
        self._locks.pop(name, None)

    async def set_weight(
        self, name: str, weight: object, *, actor: str = "admin"
    ) -> tuple[RouteRuntime, bool]:
        """Apply a weight at once, then store it; returns the route and whether the store
        took it. Applied either way: a rollback must work while the store is down."""
        route = self._route(name)
        owner = self._locks.get(name)
        if owner is not None and owner != actor and weight != 0:
            # Taking all traffic off the challenger is never refused: it is the emergency
            # brake, and must work while the store (and so the canary's commands) is down.
            raise SteeringError(
                409, f"{owner}_active", f"route {name!r} is driven by its {owner}: pause it first"
            )
        problem = weight_problem(weight)
        if problem is not None:
            raise SteeringError(400, "bad_weight", f"challenger_weight {problem}")
        if weight_problem(weight, route.has_challenger) is not None:
            raise SteeringError(409, "no_challenger", f"route {name!r} has no challenger")
        assert isinstance(weight, int | float)
        override = self._set_override(route, float(weight), actor)
        log.info("route %s: challenger weight set to %g by %s", name, override.weight, actor)
        return route, await self._put(name, weight_key(name), override.record(actor))

    def weight_set_by(self, name: str) -> str | None:
        """Who set the route's current runtime weight (None: it is the file's)."""
        return self._actors.get(name) if name in self._overrides else None

    async def promote(self, name: str, *, actor: str) -> bool:
        """Make the route's challenger its champion for all traffic; returns whether the
        store took it. The former champion is remembered for ``demote``: in the store's
        promotion record, or, on a route whose champion and challenger are registry
        references, by the registry's aliases (``previous``)."""
        route = self._route(name)
        if is_reference(route.config.champion) or is_reference(route.config.challenger):
            return await self._move_aliases(route, actor, promote=True)
        challenger = route.challenger
        if challenger is None:
            if name in self._promotions:
                return True  # promoted already (by another replica, seen through the store)
            raise SteeringError(409, "no_challenger", f"route {name!r} has no challenger")
        promotion = Promotion(
            challenger.name, route.champion.name, route.config.champion, route.config.challenger
        )
        self._promotions[name] = promotion
        self._apply_backends(route, promotion)
        weight = self._set_override(route, 0.0, actor)
        log.info("route %s: %s promoted to champion by %s", name, challenger.name, actor)
        # The weight first: a replica that reads between the two writes then sees no
        # challenger traffic either way, never the canary's last weight.
        stored = await self._put(name, weight_key(name), weight.record(actor))
        return await self._put(name, promotion_key(name), promotion.record(actor)) and stored

    async def demote(self, name: str, *, actor: str) -> bool:
        """Undo a promotion: the former champion serves all traffic again and the
        promoted backend is the challenger at weight 0. Returns whether the store took it."""
        route = self._route(name)
        if is_reference(route.config.champion) or is_reference(route.config.challenger):
            return await self._move_aliases(route, actor, promote=False)
        # Undone even where this process has not seen the promotion yet (it came through
        # another replica less than a second ago): the records below are what counts.
        self._promotions.pop(name, None)
        self._apply_backends(route, None)
        weight = self._set_override(route, 0.0, actor)
        log.info("route %s: promotion undone by %s", name, actor)
        # The weight first (see promote). A record that says "undone", not a deleted one:
        # a replica that finds no record keeps what it has (it may have promoted while the
        # store was down).
        stored = await self._put(name, weight_key(name), weight.record(actor))
        undone = {"undone": True, "updated_at": time.time(), "actor": actor}
        return await self._put(name, promotion_key(name), undone) and stored

    async def release(self, name: str, *, actor: str) -> bool:
        """Forget the route's runtime weight: the file's applies again (a canary that the
        config no longer has). Returns whether the store took it."""
        route = self._routes.get(name)
        self._overrides.pop(name, None)
        self._actors.pop(name, None)
        if route is None:
            return False
        self._changed_here(name)
        self._apply(route, self._file_weight(route))
        log.info("route %s: back to the file's weight, by %s", name, actor)
        return await self._put(name, weight_key(name), None)

    def promotion_problem(self, name: str) -> str | None:
        """Why the route cannot be promoted (None: it can be, as far as its config goes).
        A route by registry references is promoted by moving aliases: its champion and
        challenger must be two aliases of one model."""
        config = self._route(name).config
        champion, challenger = config.champion, config.challenger
        if promotable(champion, challenger):
            return None
        return (
            f"route {name!r}: a promotion moves aliases, so champion and challenger must both "
            f"be aliases of one model (model:NAME@champion, model:NAME@challenger), got "
            f"{champion!r} and {challenger!r}"
        )

    async def _move_aliases(self, route: RouteRuntime, actor: str, *, promote: bool) -> bool:
        """Promotion (or its undoing) of a route by registry references: the aliases
        move (gateway.registry.Registry.promote and demote), every replica follows them,
        and the weight goes to 0 here, the weight first as in ``promote``."""
        problem = self.promotion_problem(route.name)
        if problem is not None:
            raise SteeringError(409, "not_promotable", problem)
        champion, challenger = route.config.champion, route.config.challenger
        refs = [parse_reference(r) for r in (champion, challenger) if r and is_reference(r)]
        registry = self._registry
        if registry is None:
            raise StoreError("the model registry is not available")
        model, champion_alias, challenger_alias = refs[0].model, refs[0].alias, refs[1].alias
        assert champion_alias is not None and challenger_alias is not None
        what = "promoted" if promote else "promotion undone"
        stored = True
        if not promote:
            # Undoing: the challenger's traffic goes first, whatever becomes of the move.
            weight = self._set_override(route, 0.0, actor)
            stored = await self._put(route.name, weight_key(route.name), weight.record(actor))
        try:
            move = registry.promote if promote else registry.demote
            await move(
                model, champion=champion_alias, challenger=challenger_alias, actor=actor,
                reason=f"route {route.name}: {what} by {actor}",
            )  # fmt: skip
        except RegistryError as error:
            raise SteeringError(error.status, error.code, str(error)) from None
        if promote:
            # After the move, which clears the challenger: a refused move (the aliases
            # moved meanwhile) leaves the route as it was, not promoted by halves.
            weight = self._set_override(route, 0.0, actor)
            stored = await self._put(route.name, weight_key(route.name), weight.record(actor))
        log.info("route %s: %s (model %s's aliases moved) by %s", route.name, what, model, actor)
        if self._reresolve is not None:
            await self._reresolve()  # this process follows at once, the others within 1 s
        return stored

    def _reweigh(self, route: RouteRuntime) -> None:
        """The route's weight again, after its challenger came or went (an alias moved):
        its runtime weight where it applies, else the file's (0 without a challenger)."""
        override = self._overrides.get(route.name)
        if override is not None and override.applies_to(route):
            weight = override.weight
        else:
            weight = self._file_weight(route)
        if weight != route.weight:
            self._apply(route, weight)

    def _set_override(self, route: RouteRuntime, weight: float, actor: str) -> Override:
        override = Override(weight, route.config.split.challenger_weight)
        self._overrides[route.name] = override
        self._actors[route.name] = actor
        self._apply(route, weight)
        self._changed_here(route.name)
        return override

    def _changed_here(self, name: str) -> None:
        self._changes += 1
        self._changed[name] = self._changes

    def _route(self, name: str) -> RouteRuntime:
        route = self._routes.get(name)
        if route is None:
            raise SteeringError(404, "unknown_route", f"no route named {name!r}")
        return route

    def _file_weight(self, route: RouteRuntime) -> float:
        return route.config.split.challenger_weight if route.has_challenger else 0.0

    def _apply(self, route: RouteRuntime, weight: float) -> None:
        route.weight = weight
        route.threshold = threshold(weight)
        self._metrics.challenger_weight.labels(route.name).set(weight)

    def _apply_backends(self, route: RouteRuntime, promotion: Promotion | None) -> None:
        """Point the route's lanes at the pools that play champion and challenger now.
        In-flight requests finish where they started: they hold their pool already."""
        config = route.config
        champion_model = challenger_model = None
        if promotion is not None:
            champion, challenger = self._pools[promotion.champion], None
        else:
            serving, champion_model = self._pool_of(config.champion, route.champion_lane.pool)
            assert serving is not None  # a champion always has a pool, if one that answers 503
            champion = serving
            challenger, challenger_model = (
                self._pool_of(config.challenger, route.challenger, optional=True)
                if config.challenger
                else (None, None)
            )
        prefix = config.match.path_prefix
        for lane, pool, model in (
            (route.champion_lane, champion, champion_model),
            (route.challenger_lane, challenger or champion,
             challenger_model if challenger else champion_model),
        ):  # fmt: skip
            if lane.pool is not pool or lane.model != model:
                lane.pool, lane.model = pool, model
                lane.rewrite = rewrite_for(prefix, pool.config)  # the new backend's
                lane.trace = None  # the new pool's model: resolved at the next request
        route.has_challenger = challenger is not None
        shadow = route.shadow
        if shadow is not None:
            if is_reference(config.shadow_target) and config.shadow_target is not None:
                resolution = self._resolved.get(config.shadow_target)
                if resolution is not None and shadow.target is not resolution.pool:
                    shadow.target = resolution.pool
                    shadow.timeout_seconds = (
                        shadow.config.timeout_seconds or resolution.pool.timeout_seconds
                    )
            if is_reference(config.champion):
                shadow.champion = champion

    def _pool_of(
        self, name: str, current: BackendPool | None, *, optional: bool = False
    ) -> tuple[BackendPool | None, str | None]:
        """The pool that serves a route's champion or challenger, and the model its load
        is traced under when not the pool's. A registry reference not read yet keeps
        ``current``; one that points nowhere is a pool that answers 503 for a champion,
        and no challenger at all (``optional``)."""
        if not is_reference(name):
            return self._pools[name], None
        resolution = self._resolved.get(name)
        if resolution is None:
            return current, None
        version = resolution.version
        if version is None:
            return (None if optional else resolution.pool), None
        traced = version.trace_model if version.trace_model != resolution.pool.model else None
        return resolution.pool, traced

    # --- the state store ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def synced(self, store: StateStore) -> AsyncIterator[None]:
        """Keep runtime state in ``store`` and follow its changes while in the block."""
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

    def resync_soon(self) -> None:
        """Apply the store's state (and re-resolve references) at the next poll: a pass
        made elsewhere failed, and the revision it missed will not move again."""
        self._stale = True

    async def _put(self, name: str, key: str, record: dict[str, Any] | None) -> bool:
        """Store a change made here (``None``: delete the record); returns whether the
        store took it. If not, it is written once the store is back (_save_unsaved)."""
        if self._store is None:
            return False
        self._unsaved.pop(key, None)  # this change replaces any older one not written
        self._writing[name] = self._writing.get(name, 0) + 1
        try:
            await self._write(key, record)
        except StoreError as error:
            log.warning("route %s: change not stored yet (retried): %s", name, error)
            self._unsaved[key] = (name, record)
            return False
        finally:
            left = self._writing[name] - 1
            if left:
                self._writing[name] = left
            else:
                del self._writing[name]
        return True

    async def _write(self, key: str, record: dict[str, Any] | None) -> None:
        assert self._store is not None
        if record is None:
            await self._store.delete(key)
        else:
            await self._store.put(key, record)

    async def _save_unsaved(self) -> None:
        """Write the changes the store missed while it was down, before anything is read
        from it again (which would undo them: an emergency brake pulled during an outage
        must hold once the store is back). Raises StoreError while it is still down."""
        for key, (name, record) in list(self._unsaved.items()):
            await self._write(key, record)
            if self._unsaved.get(key) == (name, record):  # not replaced meanwhile
                del self._unsaved[key]
            log.info("route %s: a change made while the state store was down is stored", name)

    async def restore(self) -> int:
        """Apply the stored state; returns how many routes changed. Records the file has
        overruled since are deleted, so a later revert of the file cannot revive them."""
        if self._store is None:
            return 0
        await self._save_unsaved()
        read_from = self._changes
        # Written meanwhile, on another of the store's connections: the read may be
        # answered before the write lands.
        writing = set(self._writing)
        entries = await self._store.scan_prefix(PREFIX)
        # A route changed here while the store was being read (the emergency brake, a
        # promotion), or whose change was still being written when the read began, keeps
        # that change: what was read of it may predate it, and would undo it until the
        # next pass. The change's own write moves the store's revision, so the next pass
        # reads it back.
        newer = writing | {name for name, change in self._changed.items() if change > read_from}
        if writing:
            # A write in flight may have landed before the revision this pass follows was
            # read, and so not move it again: the next poll reads the store regardless.
            self._stale = True
        records: dict[str, dict[str, Mapping[str, Any]]] = {}
        for entry in entries:
            name, _, kind = entry.key[len(PREFIX) :].rpartition("/")
            if name not in newer:
                records.setdefault(kind, {})[name] = entry.value
        changed: set[str] = set()
        # Promotions first: whether a route has a challenger decides which weights fit.
        for name, value in records.get("promotion", {}).items():
            route = self._routes.get(name)
            if route is None:
                continue  # another config's route
            if value.get("undone"):
                if self._promotions.pop(name, None) is not None:
                    self._apply_backends(route, None)
                    changed.add(name)
                continue
            promotion = Promotion.from_record(value)
            if promotion is None:
                continue  # not a record this gateway wrote
            if promotion.superseded_by(route):
                await self._store.delete(promotion_key(name))
                continue
            if self._promotions.get(name) != promotion and promotion.champion in self._pools:
                self._promotions[name] = promotion
                self._apply_backends(route, promotion)
                changed.add(name)
        for name, value in records.get("weight", {}).items():
            route, override = self._routes.get(name), Override.from_record(value)
            if route is None or override is None:
                continue
            if override.superseded_by(route.config.split.challenger_weight):
                await self._store.delete(weight_key(name))
                continue
            if not override.applies_to(route):
                continue
            self._overrides[name] = override
            actor = value.get("actor")
            self._actors[name] = actor if isinstance(actor, str) else "store"
            if override.weight != route.weight:
                self._apply(route, override.weight)
                changed.add(name)
                log.info(
                    "route %s: challenger weight %g from the state store", name, override.weight
                )
        for name in changed:
            route = self._routes.get(name)  # a reload may have removed it meanwhile
            if route is not None and weight_problem(route.weight, route.has_challenger):
                self._apply(route, 0.0)  # a promotion took the challenger away
        return len(changed)

    async def _follow(self, interval: float = DEFAULT_POLL_SECONDS) -> None:
        """Apply the store's state whenever its revision moves, and again at every poll
        after a pass that failed (the revision it missed will not move again)."""
        assert self._store is not None
        applied: int | None = None
        failing = False
        while True:
            try:
                revision = await self._store.revision()
                if revision != applied or failing or self._stale:
                    self._stale = False
                    await self.restore()
                    if self._reresolve is not None:
                        await self._reresolve()  # the registry's aliases (references.py)
                    applied = revision
                    if failing:
                        log.info("runtime state from the state store applied again")
                    failing = False
            except StoreError as error:
                if not failing:
                    log.warning("cannot read runtime state from the state store: %s", error)
                failing = True
            except Exception:  # following must outlive any one bad pass
                if not failing:
                    log.exception("applying the state store's runtime state failed")
                failing = True
            await asyncio.sleep(interval)
