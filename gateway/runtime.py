"""Per-route runtime objects, parsed once from the config.

Everything the proxy needs per request is prepared here at load time, so the request
path is attribute and dict lookups: the sticky-key source, the split threshold, the
backend pools and the per-route metric records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import RouteConfig
from gateway.core.split import CHALLENGER, Variant, threshold
from gateway.keys import KeySource
from gateway.metrics import Metrics, RouteMetrics
from gateway.shadow import ShadowPolicy
from gateway.upstream import BackendPool


@dataclass(slots=True)
class RouteRuntime:
    config: RouteConfig
    champion: BackendPool
    challenger: BackendPool | None
    key_source: KeySource
    metrics: dict[Variant, RouteMetrics]
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

    def __post_init__(self) -> None:
        self.salt = self.config.split.salt
        self.allow_override = self.config.split.allow_override

    @property
    def name(self) -> str:
        return self.config.name

    def pool(self, variant: Variant) -> BackendPool:
        if variant is CHALLENGER and self.challenger is not None:
            return self.challenger
        return self.champion

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
        metrics={variant: metrics.route(config.name, variant) for variant in Variant},
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
