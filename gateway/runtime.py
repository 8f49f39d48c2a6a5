"""The live objects requests use, built from the config: a pool per backend, a route per
route (with its lanes and shadow policy), and the router over them.

Everything the proxy needs per request is prepared here at load time, so the request
path is attribute and dict lookups. A reload builds a new ``Runtime`` from the previous
one: whatever the new file leaves as it was is carried over as the same object (a pool
keeps its endpoints' health, a shadow policy its statistics, a route all of it), and only
what changed is built anew. A route's weight is not the file's business alone: it is
set by ``gateway.steering``, its one writer, after every build.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import GatewayConfig, RouteConfig
from gateway.core.reference import is_reference
from gateway.core.split import CHALLENGER, CHAMPION, Variant
from gateway.metrics import Metrics, RouteMetrics
from gateway.pipeline.rewrite import Rewrite, rewrite_for
from gateway.pipeline.route import RouteMatcher, Router
from gateway.pipeline.split import KeySource
from gateway.shadow import ShadowPolicy
from gateway.upstream import BackendPool, build_pools
from gateway.upstream.unresolved import unresolved_pool


class LoadTrace(Protocol):
    """One model's load trace (gateway.core.trace.ModelTrace); times are wall-clock
    seconds, ``perf_counter() + perf_offset``."""

    def add(self, now: float) -> None: ...

    def done(self, now: float, in_tokens: int, out_tokens: int) -> None: ...

    def done_answer(self, now: float, answer: bytes) -> None: ...

    def discard(self, now: float) -> None: ...


@dataclass(slots=True)
class Lane:
    """What a request sent to one variant of one route uses: the backend pool, the
    metric record and the model's load trace, in one object.

    With traffic spread over many routes, each request finds the objects of its route
    gone cold in the CPU's caches since that route's last request; reaching all three
    through one object (instead of a method, a dict keyed by variant and a dict keyed by
    model name) touches fewer of them.
    """

    variant: Variant
    pool: BackendPool
    metrics: RouteMetrics
    # Set by the Record step at the lane's first traced request (the tracer is the
    # proxy's); every lane of one model gets the same trace.
    trace: LoadTrace | None = None
    # How the backend wants the path and body (its path_prefix, model_name), if it does.
    rewrite: Rewrite | None = None
    # The model its load is traced under, when not the pool's: a registry version's
    # ({model}-v{version}) served by a backend of the config.
    model: str | None = None


@dataclass(slots=True, eq=False)
class RouteRuntime:
    config: RouteConfig
    key_source: KeySource
    # The lanes a request takes, by variant. A route without a challenger still has a
    # challenger lane (its champion's pool under the challenger's metrics); no request is
    # split to it, and a forced variant names it only when there is a challenger.
    champion_lane: Lane
    challenger_lane: Lane
    has_challenger: bool
    shadow: ShadowPolicy | None = None
    # The live split, written only by gateway.steering (the proxy reads ``threshold``
    # per request, so a change takes effect for the very next one).
    weight: float = 0.0
    threshold: int = 0
    # Copied out of ``config`` because the proxy reads them on every request: a slot
    # here is one lookup in an object already in cache, the config two pydantic objects
    # further (which, over many routes, are rarely in cache).
    salt: str = field(init=False)
    allow_override: bool = field(init=False)

    def __post_init__(self) -> None:
        self.salt = self.config.split.salt
        self.allow_override = self.config.split.allow_override

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def champion(self) -> BackendPool:
        return self.champion_lane.pool

    @property
    def challenger(self) -> BackendPool | None:
        return self.challenger_lane.pool if self.has_challenger else None


def build_route(
    config: RouteConfig,
    pools: Mapping[str, BackendPool],
    metrics: Metrics,
    previous: RouteRuntime | None = None,
) -> RouteRuntime:
    """The route's runtime object: ``previous`` itself when nothing it depends on changed
    (its config, and the pools it sends to), else a new one that keeps what it can."""
    champion = _pool(config.champion, pools)
    challenger = _pool(config.challenger, pools) if config.challenger else None
    target = _pool(config.shadow_target, pools) if config.shadow_target else None
    if (
        previous is not None
        and previous.config == config
        and _same(config.champion, previous.champion, champion)
        and _same(config.challenger, previous.challenger, challenger)
        and _same(
            config.shadow_target, previous.shadow.target if previous.shadow else None, target
        )
    ):
        return previous
    name = config.name
    prefix = config.match.path_prefix
    route = RouteRuntime(
        config=config,
        key_source=KeySource.parse(config.split.key),
        champion_lane=Lane(
            CHAMPION, champion, metrics.route(name, CHAMPION),
            rewrite=rewrite_for(prefix, champion.config),
        ),
        challenger_lane=Lane(
            CHALLENGER, challenger or champion, metrics.route(name, CHALLENGER),
            rewrite=rewrite_for(prefix, (challenger or champion).config),
        ),
        has_challenger=challenger is not None,
    )  # fmt: skip
    if config.shadow is not None and target is not None:
        kept = previous.shadow if previous is not None else None
        if kept is not None and kept.same_as(config.shadow, target, champion):
            route.shadow = kept
        else:
            route.shadow = ShadowPolicy(
                route=name, config=config.shadow, target=target, champion=champion,
                metrics=metrics,
            )  # fmt: skip
    return route


def _pool(name: str, pools: Mapping[str, BackendPool]) -> BackendPool:
    """The config's pool of that name; for a registry reference, one that answers 503
    until gateway.steering points the lane at what the reference resolves to."""
    if is_reference(name):
        return unresolved_pool(name, f"{name} is not resolved yet")
    return pools[name]


def _same(name: str | None, before: BackendPool | None, now: BackendPool | None) -> bool:
    """Whether a route may keep its lane's pool: the same config pool, or the same registry
    reference (what it resolves to is gateway.steering's, not the file's)."""
    return is_reference(name) or before is now


def build_router(routes: Mapping[str, RouteRuntime]) -> Router[RouteRuntime]:
    matchers = []
    for route in routes.values():
        match = route.config.match
        matchers.append(
            RouteMatcher(
                path_prefix=match.path_prefix,
                target=route,
                model=match.model,
                header_name=match.header.name if match.header else None,
                header_value=match.header.value if match.header else None,
            )
        )
    return Router(matchers)


@dataclass(frozen=True, slots=True)
class Runtime:
    """One config's live objects. Immutable as a whole: a reload makes a new one."""

    pools: dict[str, BackendPool]
    routes: dict[str, RouteRuntime]
    router: Router[RouteRuntime]

    @classmethod
    def build(
        cls, config: GatewayConfig, metrics: Metrics, previous: Runtime | None = None
    ) -> Runtime:
        pools = build_pools(
            config.backends,
            previous.pools if previous else None,
            on_ejection=metrics.endpoint_ejected,
        )
        old_routes = previous.routes if previous else {}
        routes = {
            route.name: build_route(route, pools, metrics, old_routes.get(route.name))
            for route in config.routes
        }
        return cls(pools, routes, build_router(routes))

    def removed_since(self, previous: Runtime) -> list[str]:
        """Routes that ``previous`` had and this one does not."""
        return [name for name in previous.routes if name not in self.routes]

    def endpoints_removed_since(self, previous: Runtime) -> dict[str, list[str] | None]:
        """What ``previous`` had and this one does not, by backend: None for a backend
        gone altogether, else the endpoint URLs it no longer lists."""
        removed: dict[str, list[str] | None] = {}
        for name, pool in previous.pools.items():
            now = self.pools.get(name)
            if now is None:
                removed[name] = None
                continue
            listed = {endpoint.base for endpoint in now.endpoints}
            gone = [e.base for e in pool.endpoints if e.base not in listed]
            if gone:
                removed[name] = gone
        return removed
