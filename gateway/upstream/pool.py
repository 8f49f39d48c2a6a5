"""Backend pools: endpoints, load balancing, connection caps and endpoint health.

A pool only *chooses*; the proxy does the I/O with the one shared ``UpstreamClient`` and
reports each attempt's outcome back (``succeeded``, ``failed``), which is what outlier
ejection decides on; the health checker (``gateway.upstream.health``) reports its
checks (``checked``). The decisions themselves are ``gateway.core.health``'s.

Each endpoint takes at most ``max_connections`` requests at once (each holds one
connection). A request that finds every endpoint in service at its cap waits, first come
first served, up to ``queue_timeout_seconds``: a request done with an endpoint hands its
slot straight to the first waiting one, so a newcomer never overtakes the queue.

The request path reads one number per endpoint for its health: ``ejected_until`` is 0.0
while it is in service, the end of its ejection while outlier detection holds it out
(cleared by the first pick after that), and infinity while it fails its health checks.

An endpoint of several whose last request timed out takes one request at a time until
one succeeds (its ``limit`` drops to 1): a hung endpoint then collects a single request
per timeout, not a share of all the traffic, until it is ejected. (The requests already
sent to it when the first timeout fires time out too: nothing sent is sent again.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from gateway.config import BackendConfig
from gateway.core.health import (
    CheckPolicy,
    OutlierPolicy,
    after_check,
    after_failure,
    ejection_limit,
    retry_allowed,
    streak_on_return,
)
from gateway.upstream.client import Origin

# Why an endpoint is out of rotation (the ``reason`` of gateway_endpoint_ejections_total).
CONSECUTIVE_FAILURES = "consecutive_failures"
HEALTH_CHECK = "health_check"

_random = random.random

# (backend, endpoint URL, reason): told of every ejection, for its metric.
EjectionHook = Callable[[str, str, str], None]


class NoHealthyEndpoint(Exception):
    """Every endpoint of the backend is out of rotation."""


class UpstreamOverloaded(Exception):
    """Every endpoint in service is at its connection cap, and stayed so for the queue
    timeout."""


@dataclass(slots=True, eq=False)
class Endpoint:
    base: str
    origin: Origin = field(init=False)
    # The base URL's own path ("" or e.g. "/serving"), prefixed to every request target.
    base_path: str = field(init=False)
    # Requests (and shadow calls) in flight: each holds one connection.
    active: int = 0
    # How many it may take at once: the pool's max_connections, or 1 after a timeout.
    limit: int = 1024
    consecutive_failures: int = 0
    # 0.0 in service; else when its ejection ends (infinity while failing checks).
    ejected_until: float = 0.0
    # Outlier detection's own: the current ejection's end (kept while checks fail too),
    # ejections in a row, how long the last one was, and when it last came back.
    outlier_until: float = 0.0
    ejections_in_a_row: int = 0
    last_ejection_seconds: float = 0.0
    back_since: float | None = None
    # Active health checks: passed and failed ones in a row, and whether they hold it out.
    check_passes: int = 0
    check_fails: int = 0
    check_failing: bool = False
    reason: str = ""  # why it is out of rotation, if it is

    def __post_init__(self) -> None:
        url = URL(self.base)
        self.origin = _shared_origin(url.scheme, url.raw_host or "", url.explicit_port)
        self.base_path = url.raw_path.rstrip("/")

    def target(self, raw_path: str) -> str:
        """The request target: raw_path is kept byte-exact, as the client encoded it."""
        return self.base_path + raw_path

    def healthy(self, now: float) -> bool:
        """In rotation at ``now`` (an ejection whose time is over counts as ended)."""
        return self.ejected_until <= now


# Endpoints at one address share its Origin (immutable). With many routes over the same
# servers (100 routes x 2 backends x 8 endpoints), a request then reads one of a few
# warm objects instead of one of 1,600 gone cold in the CPU's caches since its last use.
@functools.lru_cache(maxsize=4096)
def _shared_origin(scheme: str, host: str, port: int | None) -> Origin:
    return Origin.parse(scheme, host, port)


@dataclass(slots=True, eq=False)
class BackendPool:
    name: str
    model: str
    endpoints: list[Endpoint]
    strategy: str
    # Longest wait for the answer's head and, once it streams, between two chunks: a
    # long LLM stream that keeps flowing is never cut.
    timeout_seconds: float
    connect_timeout_seconds: float
    max_connections: int = 1024
    queue_timeout_seconds: float = 5.0
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    checks: CheckPolicy | None = None
    clock: Callable[[], float] = time.monotonic
    # What the pool was built from: a reload that leaves it equal keeps the pool.
    config: BackendConfig | None = None
    on_ejection: EjectionHook | None = None
    # Retries in flight (sent, not yet answered), for the retry budget.
    retries: int = 0
    # More than one endpoint: a request has somewhere else to go (kept with endpoints).
    several: bool = False
    # Requests waiting for a slot, first come first served. Shared with the pool a reload
    # builds for this backend, so that slots the old one's requests free reach them.
    waiting: deque[asyncio.Future[Endpoint]] = field(default_factory=deque)
    _next: int = field(default=0)
    _spread: int = field(default=0)

    @classmethod
    def from_config(
        cls,
        name: str,
        config: BackendConfig,
        clock: Callable[[], float] = time.monotonic,
        on_ejection: EjectionHook | None = None,
    ) -> BackendPool:
        outlier = config.outlier_detection
        check = config.health_check
        return cls(
            name=name,
            model=config.model or name,
            endpoints=[Endpoint(url, limit=config.max_connections) for url in config.urls],
            strategy=config.load_balancing,
            timeout_seconds=config.timeout_seconds,
            connect_timeout_seconds=config.connect_timeout_seconds,
            max_connections=config.max_connections,
            queue_timeout_seconds=config.queue_timeout_seconds,
            outlier=OutlierPolicy(
                consecutive_failures=outlier.consecutive_failures,
                base_ejection_seconds=outlier.base_ejection_seconds,
                max_ejection_percent=outlier.max_ejection_percent,
            ),
            checks=(
                CheckPolicy(check.healthy_threshold, check.unhealthy_threshold)
                if check is not None
                else None
            ),
            clock=clock,
            config=config,
            on_ejection=on_ejection,
            several=len(config.urls) > 1,
        )

    # --- choosing ---------------------------------------------------------------------

    def pick(self) -> Endpoint | None:
        """The endpoint for the next request: in service and below its connection cap.
        None when there is none right now: then ``acquire`` waits for one, or says why
        there is none. None, too, while requests wait: whatever room there is goes to
        them first (``acquire``). (The caller counts the request in ``active``.)"""
        if self.waiting:
            return None
        endpoints = self.endpoints
        cap = self.max_connections
        if len(endpoints) == 1:
            only = endpoints[0]
            # Outlier detection never ejects a lone endpoint (there is nowhere better to
            # send the request); failing health checks or a full endpoint take acquire.
            if only.ejected_until == 0.0 and only.active < cap:
                return only
            return None
        if self.strategy == "round_robin":
            # No list per request: step to the next endpoint that is in service and has
            # room. The clock is read only for an endpoint under ejection.
            count = len(endpoints)
            for _ in range(count):
                self._next = (self._next + 1) % count
                endpoint = endpoints[self._next]
                if (
                    endpoint.ejected_until == 0.0 or self._back_in_service(endpoint)
                ) and endpoint.active < endpoint.limit:
                    return endpoint
            return None
        # random and least_request draw from all endpoints, in O(1), as long as the drawn
        # ones are in service; otherwise they draw again from the available endpoints.
        count = len(endpoints)
        i = int(_random() * count)  # random() < 1, so i < count
        first = endpoints[i]
        if self.strategy == "random":
            if (
                first.ejected_until == 0.0 or self._back_in_service(first)
            ) and first.active < first.limit:
                return first
            return self._choose(self._available())
        # least_request as Envoy does it: the less busy of two distinct random endpoints.
        # Ties spread evenly, and no endpoint takes every new request while it looks idle.
        j = int(_random() * (count - 1))  # uniform over the other count - 1
        second = endpoints[j + 1 if j >= i else j]
        if (first.ejected_until == 0.0 or self._back_in_service(first)) and (
            second.ejected_until == 0.0 or self._back_in_service(second)
        ):
            load, other_load = first.active, second.active
            if load <= other_load:
                if load < first.limit:
                    return first
            elif other_load < second.limit:
                return second
        return self._choose(self._available())

    async def acquire(self) -> Endpoint:
        """An endpoint for a request ``pick`` found none for, its slot already counted in
        ``active``: one with room now, or the first one freed within
        ``queue_timeout_seconds``. Raises NoHealthyEndpoint when every endpoint is out of
        rotation, UpstreamOverloaded when the wait is over."""
        # Room that no release handed over (an endpoint back from an ejection, or
        # allowed more connections again) goes to those waiting first.
        self._serve_waiting()
        endpoint = None if self.waiting else self._choose(self._available())
        if endpoint is not None:
            endpoint.active += 1
            return endpoint
        if not self._any_in_service():
            raise NoHealthyEndpoint
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout_seconds
        while True:
            if loop.time() >= deadline:
                raise UpstreamOverloaded
            waiter: asyncio.Future[Endpoint] = loop.create_future()
            self.waiting.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    endpoint = await waiter
            except BaseException as error:
                if waiter.done() and not waiter.cancelled():
                    # Handed a slot just as the wait ended: pass it on.
                    self.release(waiter.result())
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self.waiting.remove(waiter)
                if isinstance(error, TimeoutError):
                    raise UpstreamOverloaded from None
                raise
            if (
                endpoint.ejected_until == 0.0 or self._back_in_service(endpoint)
            ) and endpoint in self.endpoints:
                return endpoint
            # Handed a slot on an endpoint taken out (or dropped by a reload) meanwhile.
            self.release(endpoint)
            endpoint = self._choose(self._available())
            if endpoint is not None:
                endpoint.active += 1
                return endpoint
            if not self._any_in_service():
                raise NoHealthyEndpoint

    def release(self, endpoint: Endpoint) -> None:
        """A request is done with ``endpoint``: its slot goes to the first waiting
        request, if any. (The request path does ``endpoint.active -= 1`` itself while
        nobody waits: ``if pool.waiting: pool.release(endpoint)``.)"""
        waiting = self.waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(endpoint)
                return
        endpoint.active -= 1

    def _serve_waiting(self) -> None:
        """Hand the room there is to the waiting requests, first come first served:
        room a release did not hand over, because it came otherwise (an endpoint back
        in service, or its limit raised again after a timeout)."""
        waiting = self.waiting
        while waiting:
            endpoint = self._choose(self._available())
            if endpoint is None:
                return
            waiter = waiting.popleft()
            if not waiter.done():
                endpoint.active += 1
                waiter.set_result(endpoint)

    def may_retry(self) -> bool:
        """Whether the retry budget allows one more retry now (gateway.core.health)."""
        return retry_allowed(sum(e.active for e in self.endpoints), self.retries)

    def other_than(self, endpoint: Endpoint) -> Endpoint | None:
        """Another endpoint in service with room, for a retry (its slot not yet counted),
        or None."""
        return self._choose(self._available(exclude=endpoint))

    def _available(self, exclude: Endpoint | None = None) -> list[Endpoint]:
        several = len(self.endpoints) > 1
        cap = self.max_connections
        return [
            e
            for e in self.endpoints
            if e is not exclude
            and (e.ejected_until == 0.0 or self._back_in_service(e))
            and e.active < (e.limit if several else cap)
        ]

    def _any_in_service(self) -> bool:
        return any(e.ejected_until == 0.0 or self._back_in_service(e) for e in self.endpoints)

    def _choose(self, candidates: list[Endpoint]) -> Endpoint | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.strategy == "round_robin":
            # Off the usual path (a retry, a wait): spread over the candidates without
            # moving the rotation that pick() follows.
            self._spread += 1
            return candidates[self._spread % len(candidates)]
        if self.strategy == "random":
            return random.choice(candidates)
        first, second = random.sample(candidates, 2)
        return first if first.active <= second.active else second

    def _back_in_service(self, endpoint: Endpoint) -> bool:
        """Whether an ejected endpoint's ejection is over. Once it is, it is cleared, so
        picking the endpoint needs no clock read again until its next ejection; it is
        back on probation (one failure ejects it again)."""
        now = self.clock()
        if endpoint.ejected_until <= now:
            endpoint.ejected_until = endpoint.outlier_until = 0.0
            endpoint.back_since = now
            endpoint.consecutive_failures = streak_on_return(self.outlier)
            endpoint.reason = ""
            return True
        return False

    # --- outcomes -----------------------------------------------------------------------

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0
        if endpoint.limit != self.max_connections:
            endpoint.limit = self.max_connections  # room again after a timeout
            if self.waiting:
                self._serve_waiting()

    def failed(self, endpoint: Endpoint, *, timed_out: bool = False) -> None:
        """An attempt on ``endpoint`` failed: no connection, a timeout, a 5xx answer or a
        broken one. Enough in a row eject it (see gateway.core.health). After a timeout
        it takes one request at a time until one succeeds (if it has company)."""
        if endpoint.ejected_until != 0.0 and not self._back_in_service(endpoint):
            return  # out already: a request sent before its ejection, failing late
        if timed_out and len(self.endpoints) > 1:
            endpoint.limit = 1
        now = self.clock()
        out = sum(1 for e in self.endpoints if e.ejected_until > now)
        verdict = after_failure(
            self.outlier,
            streak=endpoint.consecutive_failures,
            in_a_row=endpoint.ejections_in_a_row,
            back_since=endpoint.back_since,
            last_ejection=endpoint.last_ejection_seconds,
            now=now,
            room=out < ejection_limit(len(self.endpoints), self.outlier.max_ejection_percent),
        )
        endpoint.consecutive_failures = verdict.streak
        if verdict.ejected_for:
            endpoint.ejections_in_a_row = verdict.in_a_row
            endpoint.last_ejection_seconds = verdict.ejected_for
            endpoint.ejected_until = endpoint.outlier_until = now + verdict.ejected_for
            endpoint.back_since = None
            endpoint.reason = CONSECUTIVE_FAILURES
            self._ejected(endpoint, CONSECUTIVE_FAILURES)

    def checked(self, endpoint: Endpoint, passed: bool) -> None:
        """An active health check of ``endpoint`` passed or failed."""
        if self.checks is None:
            return
        was_failing = endpoint.check_failing
        endpoint.check_passes, endpoint.check_fails, endpoint.check_failing = after_check(
            self.checks,
            passed=passed,
            passes=endpoint.check_passes,
            fails=endpoint.check_fails,
            failing=was_failing,
        )
        if endpoint.check_failing and not was_failing:
            endpoint.ejected_until = math.inf
            endpoint.reason = HEALTH_CHECK
            self._ejected(endpoint, HEALTH_CHECK)
        elif was_failing and not endpoint.check_failing:
            self._checks_passed(endpoint)
            if self.waiting:
                self._serve_waiting()  # back in rotation: room for those waiting

    def _checks_passed(self, endpoint: Endpoint) -> None:
        """Back from failing its checks: in rotation, unless an outlier ejection it had
        before is still running."""
        endpoint.check_failing = False
        if endpoint.outlier_until > self.clock():
            endpoint.ejected_until = endpoint.outlier_until
            endpoint.reason = CONSECUTIVE_FAILURES
        else:
            endpoint.ejected_until = endpoint.outlier_until = 0.0
            endpoint.consecutive_failures = 0
            endpoint.limit = self.max_connections
            endpoint.reason = ""

    def _ejected(self, endpoint: Endpoint, reason: str) -> None:
        if self.on_ejection is not None:
            self.on_ejection(self.name, endpoint.base, reason)

    # --- what the admin API and the metrics show ---------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """Each endpoint's standing, as the admin API shows it."""
        now = self.clock()
        shown = []
        for e in self.endpoints:
            healthy = e.healthy(now)
            out_for = e.ejected_until - now
            shown.append(
                {
                    "url": e.base,
                    "healthy": healthy,
                    "reason": None if healthy else e.reason,
                    "ejected_for_seconds": (
                        round(out_for, 3) if not healthy and math.isfinite(out_for) else None
                    ),
                    "active": e.active,
                    "consecutive_failures": e.consecutive_failures,
                    "ejections_in_a_row": e.ejections_in_a_row,
                }
            )
        return shown

    # --- reload -------------------------------------------------------------------------

    def carry_over(self, previous: BackendPool) -> None:
        """Take over ``previous``'s endpoints that this pool lists too (the same objects:
        their health, failures, ejections and requests in flight go on) and its queue.
        For a backend whose config a reload changed."""
        kept: dict[str, list[Endpoint]] = {}
        for endpoint in previous.endpoints:
            kept.setdefault(endpoint.base, []).append(endpoint)
        endpoints = []
        for endpoint in self.endpoints:
            same = kept.get(endpoint.base)
            if same:
                endpoint = same.pop(0)
                if endpoint.limit > 1 or not endpoint.consecutive_failures:
                    endpoint.limit = self.max_connections  # which may have changed
                if self.checks is None and endpoint.check_failing:
                    self._checks_passed(endpoint)  # nothing checks it any more
            endpoints.append(endpoint)
        self.endpoints = endpoints
        self.several = len(endpoints) > 1
        self.waiting = previous.waiting


def build_pools(
    backends: Mapping[str, BackendConfig],
    previous: Mapping[str, BackendPool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_ejection: EjectionHook | None = None,
) -> dict[str, BackendPool]:
    """A pool per backend. A backend whose config a reload left as it was keeps its pool
    (the same object), and with it the endpoints' health and the balancing position; one
    whose config changed keeps the endpoints it still lists (see ``carry_over``)."""
    previous = previous or {}
    pools: dict[str, BackendPool] = {}
    for name, config in backends.items():
        kept = previous.get(name)
        if kept is not None and kept.config == config:
            pools[name] = kept
            continue
        pool = BackendPool.from_config(name, config, clock, on_ejection)
        if kept is not None:
            pool.carry_over(kept)
        pools[name] = pool
    return pools
