"""The canary controller: drives ``gateway.core.canary`` on a timer, for every route with
a ``canary:`` block, shared by all the gateway's processes through the state store.

Every process (each worker of each replica), about once a second:

- reads each canary's status from the store (``canary/{route}/status``), so that its
  metrics, its route views and the weight lock agree with the leader's;
- writes what it counted for the canary's current step (``gateway.controller.counting``);
- takes or renews the route's leader lease (``canary/{route}/lease``: compare-and-set
  with a TTL, renewed at a third of it).

The leader of a route, every ``evaluation_interval_seconds``: sums every process's
counts, asks ``decide``, asks the gate webhooks before an advance, writes the new status
with compare-and-set (so that an operator's command in between wins, and a decision is
taken and counted once), and applies it through ``gateway.steering``, whose records every
replica follows. Should the leader die, its lease runs out and another process takes
over from the stored status, step, step start and counts; a restarted gateway resumes
the same way. Operator commands (start, pause, resume, promote, rollback) may come to
any process: they are compare-and-set writes of the status as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config import CanaryConfig
from gateway.controller.counting import (
    StepCounter,
    StepTotals,
    counts_key,
    counts_prefix,
    segment_of,
    sum_segments,
)
from gateway.controller.webhooks import Webhooks
from gateway.core import canary as core
from gateway.core.canary import Action, Decision, Evidence, Policy, Reason, State, Status
from gateway.core.refused import Refused
from gateway.core.sequential import rate_bounds
from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.runtime import RouteRuntime, Runtime
from gateway.steering import Steering, SteeringError
from gateway.store import Entry, StateStore, StoreError

log = logging.getLogger("gateway.controller")

TICK_SECONDS = 1.0
# A process's counts outlive it this long in the store, for a leader to sum.
COUNTS_TTL_SECONDS = 7 * 24 * 3600.0
LOCK_OWNER = "canary"
EVENT_OF = {
    Action.START: "started",
    Action.ADVANCE: "advanced",
    Action.ROLLBACK: "rolled_back",
    Action.PROMOTE: "promoted",
    Action.PAUSE: "paused",
    Action.RESUME: "resumed",
}


def status_key(route: str) -> str:
    return f"canary/{route}/status"


def lease_key(route: str) -> str:
    return f"canary/{route}/lease"


def policy_of(config: CanaryConfig, *, shadow_noise: bool = False) -> Policy:
    """The decision rule's settings from a route's ``canary:`` block; ``shadow_noise``:
    whether the route's shadow also samples the champion against itself."""
    return Policy(
        steps=config.resolved_steps,
        step_interval_seconds=config.step_interval_seconds,
        min_requests=config.min_requests,
        max_error_rate_increase=config.max_error_rate_increase,
        success_threshold=config.success_threshold,
        confidence=config.confidence,
        max_latency_ratio=config.max_latency_ratio,
        latency_quantile=config.latency_quantile,
        latency_bounds=LATENCY_BUCKETS,
        min_shadow_agreement=config.min_shadow_agreement,
        shadow_noise=shadow_noise,
        max_step_seconds=config.max_step_seconds,
        on_inconclusive=config.on_inconclusive,
        auto_promote=config.auto_promote,
    )


class CanaryError(Refused):
    """A canary command refused."""


@dataclass(slots=True)
class _Canary:
    """One route's canary as this process sees it."""

    route: RouteRuntime
    config: CanaryConfig
    policy: Policy
    status: Status = field(default_factory=Status)
    leader: bool = False
    lease_version: int | None = None
    lease_renew_at: float = 0.0
    next_evaluation: float = 0.0
    status_version: int = -1  # of the status last applied: an older one read late is not
    # This process's config may name another challenger than the running canary's (a
    # start or a reload since): look once, and start the canary over if so.
    check_challenger: bool = True
    counter: StepCounter = field(default_factory=StepCounter)
    evaluation: asyncio.Task[None] | None = None
    store_failing: bool = False

    @property
    def name(self) -> str:
        return self.route.name


class CanaryController:
    def __init__(
        self,
        steering: Steering,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        process_id: str | None = None,
        tick_seconds: float = TICK_SECONDS,
    ) -> None:
        self._steering = steering
        self._metrics = metrics
        self._clock = clock
        self.process_id = process_id or uuid.uuid4().hex[:12]
        self._max_tick = self._tick = tick_seconds
        self._canaries: dict[str, _Canary] = {}
        # Canaries whose block (or route) a reload removed: ended at the next tick.
        self._retiring: dict[str, _Canary] = {}
        self._store: StateStore | None = None
        self._webhooks = Webhooks(metrics)

    # --- configuration --------------------------------------------------------------------

    def adopt(self, runtime: Runtime) -> None:
        """The routes of a config just loaded: a canary whose route keeps its challenger
        carries on; one whose challenger changed starts over at step 0 (at the next tick,
        by this process, which saw the change)."""
        canaries: dict[str, _Canary] = {}
        for name, route in runtime.routes.items():
            config = route.config.canary
            if config is None:
                continue
            noise = route.shadow is not None and route.shadow.config.baseline.sample_rate > 0
            policy = policy_of(config, shadow_noise=noise)
            kept = self._canaries.get(name)
            if kept is None:
                canaries[name] = _Canary(route, config, policy)
                continue
            changed = kept.route.config.challenger != route.config.challenger
            kept.route, kept.config, kept.policy = route, config, policy
            kept.check_challenger = kept.check_challenger or changed
            canaries[name] = kept
        for name, gone in self._canaries.items():
            if name not in canaries:
                self._steering.unlock(name)
                if gone.evaluation is not None:
                    gone.evaluation.cancel()
                self._retiring[name] = gone
        self._canaries = canaries
        # Counts are flushed and leases tended every tick: often enough for the fastest
        # evaluation configured (tests and demos evaluate more often than every second).
        self._tick = min(
            [self._max_tick, *(c.config.evaluation_interval_seconds for c in canaries.values())]
        )
        for canary in canaries.values():
            self._show(canary)

    def routes(self) -> Mapping[str, Any]:
        return self._canaries

    def recheck_challenger(self, name: str) -> None:
        """The route's challenger is another model now (its registry alias moved): a
        running canary starts over at the next tick, as after a reload that changed it."""
        canary = self._canaries.get(name)
        if canary is not None:
            canary.check_challenger = True

    def status(self, name: str) -> Status | None:
        canary = self._canaries.get(name)
        return canary.status if canary is not None else None

    # --- running ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, store: StateStore) -> AsyncIterator[None]:
        self._store = store
        await self._webhooks.open()
        loop = asyncio.create_task(self._run(), name="canary-controller")
        try:
            yield
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            for canary in self._canaries.values():
                if canary.evaluation is not None:
                    canary.evaluation.cancel()
                    await asyncio.gather(canary.evaluation, return_exceptions=True)
                await self._quietly(canary, self._flush(canary))
                await self._quietly(canary, self._release(canary))
            await self._webhooks.close()
            self._store = None

    async def _run(self) -> None:
        while True:
            for name, gone in list(self._retiring.items()):
                await self._quietly(gone, self._retire(gone))
                if not gone.store_failing:
                    del self._retiring[name]
            for canary in list(self._canaries.values()):
                await self._quietly(canary, self._tend(canary))
            await asyncio.sleep(self._tick)

    async def _quietly(self, canary: _Canary, work: Any) -> None:
        """A store that is down is retried at the next tick, never fatal; it is logged
        once when it goes and once when it is back, not every second in between."""
        try:
            await work
        except StoreError as error:
            if not canary.store_failing:
                log.warning("canary %s: state store unavailable: %s", canary.name, error)
            canary.store_failing = True
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("canary %s: unexpected error", canary.name)
            return
        if canary.store_failing:
            canary.store_failing = False
            log.info("canary %s: state store available again", canary.name)

    async def _tend(self, canary: _Canary) -> None:
        await self._refresh(canary)
        if canary.check_challenger:
            await self._restart_for_new_challenger(canary)
        await self._flush(canary)
        now = self._clock()
        await self._lease(canary, now)
        evaluating = canary.evaluation is not None and not canary.evaluation.done()
        if canary.leader and not evaluating and now >= canary.next_evaluation:
            canary.next_evaluation = now + canary.config.evaluation_interval_seconds
            canary.evaluation = asyncio.create_task(
                self._quietly(canary, self._evaluate(canary)), name=f"canary-{canary.name}"
            )

    async def _refresh(self, canary: _Canary) -> int | None:
        """Read the status; returns its version (None: there is none yet). A read that
        comes back after this process wrote a newer status (the answer was under way
        meanwhile) is not applied."""
        store = self._require_store()
        entry = await store.get_entry(status_key(canary.name))
        if entry is not None and entry.version < canary.status_version:
            return canary.status_version
        self._applied(canary, Status.from_dict(entry.value) if entry else Status(), entry)
        return entry.version if entry is not None else None

    def _applied(self, canary: _Canary, status: Status, entry: Entry | int | None) -> None:
        version = entry.version if isinstance(entry, Entry) else entry
        canary.status_version = -1 if version is None else version
        if status != canary.status:
            canary.status = status
            self._show(canary)

    def _show(self, canary: _Canary) -> None:
        """Make this process's gauges, weight lock and counting follow the status."""
        status, name = canary.status, canary.name
        for state in State:
            self._metrics.canary_state.labels(name, state.value).set(
                1 if state is status.state else 0
            )
        self._metrics.canary_step.labels(name).set(
            status.step if status.state in core.ACTIVE else -1
        )
        if status.state in core.EVALUATED:
            self._steering.lock(name, LOCK_OWNER)
        else:
            self._steering.unlock(name)
        # Counted only where this process sends what the canary is about: a process still
        # on an older config (another challenger) must not add its counts to this one.
        challenger = canary.route.challenger
        counting = (
            status.state in core.ACTIVE
            and bool(status.canary_id)
            and challenger is not None
            and challenger.name == status.challenger
        )
        segment = segment_of(status.step, status.step_started)
        canary.counter.count_into((status.canary_id, segment) if counting else None)

    # --- counting --------------------------------------------------------------------------

    async def _flush(self, canary: _Canary) -> None:
        counter = canary.counter
        counter.take(canary.route)
        if not counter.unwritten or counter.step_key is None:
            return
        canary_id, segment = counter.step_key
        key = counts_key(canary.name, canary_id, segment, self.process_id)
        await self._require_store().put(key, counter.totals.as_dict(), ttl=COUNTS_TTL_SECONDS)
        counter.written()

    async def _counts(self, canary: _Canary, status: Status) -> dict[str, StepTotals]:
        entries = await self._require_store().scan_prefix(
            counts_prefix(canary.name, status.canary_id)
        )
        return sum_segments(entries)

    async def _forget_counts(self, name: str, canary_id: str) -> None:
        """A finished canary's counts (a new one starts from nothing)."""
        store = self._require_store()
        for entry in await store.scan_prefix(counts_prefix(name, canary_id)):
            await store.delete(entry.key)

    def _evidence(self, status: Status, segments: Mapping[str, StepTotals]) -> Evidence:
        whole = sum(segments.values(), StepTotals())
        step = segments.get(segment_of(status.step, status.step_started), StepTotals())
        return Evidence(
            whole.champion,
            whole.challenger,
            step.champion,
            step.challenger,
            status.step_started,
            whole.shadow,
            status.weight,
        )

    # --- leadership --------------------------------------------------------------------------

    async def _lease(self, canary: _Canary, now: float) -> None:
        store = self._require_store()
        ttl = canary.config.leader_lease_seconds
        if canary.leader and now < canary.lease_renew_at:
            return
        record = {"holder": self.process_id, "at": now}
        key = lease_key(canary.name)
        if canary.leader:
            version = await store.compare_and_set(key, canary.lease_version, record, ttl=ttl)
        else:
            entry = await store.get_entry(key)
            version = None
            if entry is None:
                version = await store.compare_and_set(key, None, record, ttl=ttl)
        was_leader = canary.leader
        canary.leader = version is not None
        canary.lease_version = version
        canary.lease_renew_at = now + ttl / 3
        if canary.leader and not was_leader:
            log.info("canary %s: this process (%s) leads it", canary.name, self.process_id)
            canary.next_evaluation = now  # evaluate at once: the last leader may be long gone
        elif was_leader and not canary.leader:
            log.warning("canary %s: lost the leader lease", canary.name)

    async def _release(self, canary: _Canary) -> None:
        if canary.leader and self._store is not None:
            entry = await self._store.get_entry(lease_key(canary.name))
            if entry is not None and entry.value.get("holder") == self.process_id:
                await self._store.delete(lease_key(canary.name))
            canary.leader = False

    # --- decisions ----------------------------------------------------------------------------

    async def _evaluate(self, canary: _Canary) -> None:
        store = self._require_store()
        await self._flush(canary)  # this process's latest counts are in the sum too
        version = await self._refresh(canary)
        status = canary.status
        if status.state not in core.EVALUATED or canary.check_challenger:
            return
        now = self._clock()
        if self._braked(canary, status):
            # An operator took all traffic off the challenger (the one weight change never
            # refused, e.g. while the store was down): the canary is over.
            new = core.command(status, Action.ROLLBACK, now)
            if await store.compare_and_set(status_key(canary.name), version, new.as_dict()):
                await self._took(canary, status, new, Action.ROLLBACK)
            return
        evidence = self._evidence(status, await self._counts(canary, status))
        decision = core.decide(evidence, canary.policy, now)
        if decision.action is Action.ADVANCE:
            last = status.step >= len(canary.policy.steps) - 1
            if not last or canary.policy.auto_promote:
                asked = "promote" if last else "advance"
                payload = self._payload(canary, status, asked, decision.message, evidence)
                if not await self._webhooks.gate(canary.config.webhooks, payload):
                    decision = Decision(
                        Action.HOLD, Reason.GATE_CLOSED,
                        f"a gate webhook did not allow the {asked}", decision.checks, evidence,
                    )  # fmt: skip
        new = core.apply(status, decision, canary.policy, now)
        written = await store.compare_and_set(status_key(canary.name), version, new.as_dict())
        if written is None:
            return  # an operator's command came first: decide again next time
        try:
            await self._took(
                canary, status, new, new_action(status, new, decision.action), version=written
            )
        except (SteeringError, StoreError) as refused:  # an automatic promotion refused: held
            log.warning("canary %s: %s", canary.name, refused)

    def _braked(self, canary: _Canary, status: Status) -> bool:
        route = canary.route
        setter = self._steering.weight_set_by(canary.name)
        return route.weight == 0 < status.weight and setter not in (None, LOCK_OWNER)

    async def _took(
        self,
        canary: _Canary,
        old: Status,
        new: Status,
        action: Action,
        version: int | None = None,
    ) -> None:
        """A decision or command is in the store: apply it here, count it, announce it.
        Whatever this process believed the weight to be, the canary's is written (a
        process whose view lags must not skip the write the other replicas follow)."""
        self._applied(canary, new, version)
        name = canary.name
        promoting = new.state is State.PROMOTED and old.state is not State.PROMOTED
        demoting = old.state is State.PROMOTED and new.state is not State.PROMOTED
        try:
            if promoting:
                await self._steering.promote(name, actor=LOCK_OWNER)
            elif demoting:
                await self._steering.demote(name, actor=LOCK_OWNER)
            elif (
                new.weight != old.weight
                or action is not Action.HOLD
                or canary.route.weight != new.weight
            ) and canary.route.has_challenger:
                await self._steering.set_weight(name, new.weight, actor=LOCK_OWNER)
        except (SteeringError, StoreError) as refused:
            if promoting or demoting:
                # Nothing was promoted (or undone): e.g. the registry's aliases moved
                # meanwhile. The status goes back, so it never says what did not happen;
                # the error goes on to the command's caller.
                await self._undo(canary, old, version)
                raise
            # The status is written: it stands, and the leader keeps the weight in line.
            log.warning("canary %s: %s applied, its weight not: %s", name, action.value, refused)
        self._metrics.canary_decisions.labels(name, action.value).inc()
        if action is Action.START and old.canary_id and old.canary_id != new.canary_id:
            await self._forget_counts(name, old.canary_id)
        event = EVENT_OF.get(action)
        if event is not None and (action is not Action.ADVANCE or new.step != old.step):
            self._webhooks.notify(
                canary.config.webhooks,
                self._payload(canary, new, event, new.reason, None),
            )

    async def _undo(self, canary: _Canary, old: Status, version: int | None) -> None:
        """Put back the status a promotion (or its undoing) replaced, when the move itself
        was refused."""
        if version is None:
            return
        store = self._require_store()
        restored = await store.compare_and_set(status_key(canary.name), version, old.as_dict())
        if restored is not None:
            self._applied(canary, old, restored)

    def _payload(
        self, canary: _Canary, status: Status, event: str, reason: str, evidence: Evidence | None
    ) -> dict[str, Any]:
        decision = status.last_decision or {}
        return {
            "route": canary.name,
            "event": event,
            "state": status.state.value,
            "step": status.step,
            "weight": status.weight,
            "reason": reason,
            "evidence": evidence.as_dict() if evidence is not None else decision.get("evidence"),
        }

    # --- operator commands -----------------------------------------------------------------

    async def command(self, name: str, action: Action) -> Status:
        """start, pause, resume, promote or rollback, from any process."""
        canary = self._canaries.get(name)
        if canary is None:
            raise CanaryError(404, "no_canary", f"route {name!r} has no canary configured")
        store = self._require_store()
        for _ in range(5):  # compare-and-set: retried if the leader wrote in between
            entry = await store.get_entry(status_key(name))
            old = Status.from_dict(entry.value) if entry is not None else Status()
            new = self._commanded(canary, old, action)
            version = entry.version if entry is not None else None
            written = await store.compare_and_set(status_key(name), version, new.as_dict())
            if written is not None:
                await self._took(canary, old, new, action, version=written)
                return new
        raise CanaryError(409, "conflict", f"the canary of {name!r} kept changing; try again")

    def _commanded(self, canary: _Canary, old: Status, action: Action) -> Status:
        now = self._clock()
        try:
            if action is Action.START:
                challenger = canary.route.challenger
                if challenger is None:
                    raise CanaryError(
                        409, "no_challenger",
                        f"route {canary.name!r} has no challenger to start a canary with",
                    )  # fmt: skip
                return core.start(old, canary.policy, now, uuid.uuid4().hex[:12], challenger.name)
            new = core.command(old, action, now)
            if action is Action.PROMOTE and canary.route.challenger is None:
                # Checked before the status is written: a promotion that cannot be applied
                # must not be recorded as done.
                raise CanaryError(
                    409, "no_challenger", f"route {canary.name!r} has no challenger to promote"
                )
            problem = self._steering.promotion_problem(canary.name)
            if action is Action.PROMOTE and problem is not None:
                raise CanaryError(409, "not_promotable", problem)
            return new
        except core.NotAllowed as refused:
            raise CanaryError(409, "canary_state", str(refused)) from None

    async def _restart_for_new_challenger(self, canary: _Canary) -> None:
        """Start the canary over when this process's config (just loaded, at start or by
        a reload) names another challenger than the one it ran with: evidence about one
        model says nothing about another."""
        store = self._require_store()
        entry = await store.get_entry(status_key(canary.name))
        old = Status.from_dict(entry.value) if entry is not None else Status()
        challenger = canary.route.challenger
        moved_on = challenger is not None and old.challenger != challenger.name
        if old.state in core.ACTIVE and moved_on and challenger is not None:
            new = core.restart(
                old, canary.policy, self._clock(), uuid.uuid4().hex[:12], challenger.name,
                Reason.CHALLENGER_CHANGED,
            )  # fmt: skip
            version = entry.version if entry is not None else None
            written = await store.compare_and_set(status_key(canary.name), version, new.as_dict())
            if written is None:
                return  # changed meanwhile: look again at the next tick
            log.info("canary %s: challenger changed to %s, restarted", canary.name, challenger.name)
            await self._took(canary, old, new, Action.START, version=written)
        canary.check_challenger = False

    async def _retire(self, canary: _Canary) -> None:
        """A reload removed this canary (its block, or its route): a running one ends as
        rolled back, and the file's weight for the route wins again."""
        store = self._require_store()
        name = canary.name
        entry = await store.get_entry(status_key(name))
        old = Status.from_dict(entry.value) if entry is not None else Status()
        if entry is not None and old.state in core.ACTIVE:
            new = core.command(old, Action.ROLLBACK, self._clock())
            new = replace(new, reason=Reason.CANARY_REMOVED.value)
            if await store.compare_and_set(status_key(name), entry.version, new.as_dict()):
                self._metrics.canary_decisions.labels(name, Action.ROLLBACK.value).inc()
                log.warning("canary %s: removed from the config while %s", name, old.state.value)
        # Every process that loaded the config without it lets go of the canary's weight.
        if self._steering.weight_set_by(name) == LOCK_OWNER:
            await self._steering.release(name, actor=LOCK_OWNER)

    # --- views --------------------------------------------------------------------------------

    async def view(self, name: str) -> dict[str, Any]:
        """The canary as the admin API and the CLI show it."""
        canary = self._canaries.get(name)
        if canary is None:
            raise CanaryError(404, "no_canary", f"route {name!r} has no canary configured")
        store = self._require_store()
        await self._refresh(canary)
        status = canary.status
        steps = await self._counts(canary, status) if status.canary_id else {}
        lease = await store.get_entry(lease_key(name))
        now = self._clock()
        evidence = self._evidence(status, steps)
        alpha = canary.policy.alpha / 2
        return {
            "route": name,
            **status.as_dict(),
            "steps": list(canary.policy.steps),
            "step_elapsed": max(0.0, now - status.step_started)
            if status.state in core.ACTIVE
            else None,
            "leader": lease.value.get("holder") if lease is not None else None,
            "process": self.process_id,  # the process answering: is it the leader?
            "next_evaluation_in": max(0.0, canary.next_evaluation - now) if canary.leader else None,
            "counts": {
                "step": _variant_views(evidence.step_champion, evidence.step_challenger, alpha),
                "canary": _variant_views(evidence.champion, evidence.challenger, alpha),
                "shadow": evidence.shadow.as_dict(),
            },
            "config": canary.config.model_dump(mode="json"),
        }

    def _require_store(self) -> StateStore:
        if self._store is None:
            raise StoreError("the canary controller is not running")
        return self._store


def new_action(old: Status, new: Status, decided: Action) -> Action:
    """The decision as counted: an advance past the last step is a promotion when it
    promoted."""
    if decided is Action.ADVANCE and new.state is State.PROMOTED:
        return Action.PROMOTE
    return decided


def _variant_views(champion: core.Counts, challenger: core.Counts, alpha: float) -> dict[str, Any]:
    def one(counts: core.Counts) -> dict[str, Any]:
        bounds = rate_bounds(counts.failures, counts.requests, alpha)
        return {
            "requests": counts.requests,
            "failures": counts.failures,
            "failure_rate": counts.failures / counts.requests if counts.requests else None,
            "failure_rate_bounds": [bounds.low, bounds.high],
        }

    return {"champion": one(champion), "challenger": one(challenger)}
