"""Per-route runtime objects, parsed once from the config.

Everything the proxy needs per request is prepared here at load time, so the request
path is attribute and dict lookups: the sticky-key source, the split threshold, the
backend pools and the per-route metric records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Protocol

from gateway.config import RouteConfig
from gateway.core.split import CHALLENGER, CHAMPION, Variant, threshold
from gateway.keys import KeySource
from gateway.metrics import Metrics, RouteMetrics
from gateway.shadow import ShadowPolicy
from gateway.upstream import BackendPool


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
    # Set by the proxy at the lane's first traced request (the tracer is the proxy's);
    # every lane of one model gets the same trace.
    trace: LoadTrace | None = None


@dataclass(slots=True)
class RouteRuntime:
    config: RouteConfig
    champion: BackendPool
    challenger: BackendPool | None
    key_source: KeySource
    metrics: InitVar[Metrics]  # where the lanes' metric records come from
    # The lanes a request takes, by variant. A route without a challenger still has a
    # challenger lane (its champion's pool under the challenger's metrics); no request is
    # split to it, and a forced variant names it only when there is a challenger.
    champion_lane: Lane = field(init=False)
    challenger_lane: Lane = field(init=False)
    shadow: ShadowPolicy | None = None
    weight: float = 0.0
    threshold: int = 0
    # Copied out of ``config`` because the proxy reads them on every request: a slot
    # here is one lookup in an object already in cache, the config two pydantic objects
    # further (which, over many routes, are rarely in cache).
    salt: str = field(init=False)
    allow_override: bool = field(init=False)
    # Called after every weight change (metrics gauge, persistence).
    on_weight_change: list[Callable[[RouteRuntime], None]] = field(default_factory=list)

    def __post_init__(self, metrics: Metrics) -> None:
        self.salt = self.config.split.salt
        self.allow_override = self.config.split.allow_override
        name = self.config.name
        self.champion_lane = Lane(CHAMPION, self.champion, metrics.route(name, CHAMPION))
        self.challenger_lane = Lane(
            CHALLENGER, self.challenger or self.champion, metrics.route(name, CHALLENGER)
        )

    @property
    def name(self) -> str:
        return self.config.name

    def set_weight(self, weight: float) -> None:
        """Takes effect for the very next request: the proxy reads ``threshold`` per request."""
        if self.challenger is None and weight > 0:
            raise ValueError(f"route {self.name!r} has no challenger")
        new_threshold = threshold(weight)
        self.weight = weight
        self.threshold = new_threshold
        for callback in self.on_weight_change:
            callback(self)


def build_route(
    config: RouteConfig, pools: dict[str, BackendPool], metrics: Metrics
) -> RouteRuntime:
    route = RouteRuntime(
        config=config,
        champion=pools[config.champion],
        challenger=pools[config.challenger] if config.challenger else None,
        key_source=KeySource.parse(config.split.key),
        metrics=metrics,
    )
    target = config.shadow_target
    if config.shadow is not None and target is not None:
        route.shadow = ShadowPolicy(
            route=config.name,
            config=config.shadow,
            target=pools[target],
            champion=route.champion,
            metrics=metrics,
            route_key=route.key_source,
        )
    gauge = metrics.challenger_weight.labels(config.name)
    route.on_weight_change.append(lambda r: gauge.set(r.weight))
    route.set_weight(config.split.challenger_weight)
    return route
