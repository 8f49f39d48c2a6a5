"""Per-route runtime objects, parsed once from the config.

Everything the proxy needs per request is prepared here at load time, so the request
path is attribute and dict lookups: the sticky-key source, the split threshold, the
backend pools and the pre-bound metric children.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import RouteConfig
from gateway.core.split import Variant, threshold
from gateway.metrics import Metrics, RouteMetrics
from gateway.upstream import BackendPool


class KeyKind(enum.Enum):
    REQUEST_ID = "request_id"
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a route's sticky split key comes from (``split.key`` in the config)."""

    kind: KeyKind
    name: str = ""

    @classmethod
    def parse(cls, spec: str) -> KeySource:
        if spec == "request_id":
            return cls(KeyKind.REQUEST_ID)
        kind, _, name = spec.partition(":")
        return cls(KeyKind(kind), name)

    def extract(self, request: web.BaseRequest, request_id: str) -> str:
        """The key for this request. A request without the named header, cookie or
        query parameter falls back to its request ID, so it is still split by weight."""
        kind = self.kind
        if kind is KeyKind.REQUEST_ID:
            return request_id
        if kind is KeyKind.HEADER:
            value = request.headers.get(self.name)
        elif kind is KeyKind.COOKIE:
            value = request.cookies.get(self.name)
        else:
            value = request.query.get(self.name)
        return value if value else request_id


@dataclass(slots=True)
class RouteRuntime:
    config: RouteConfig
    champion: BackendPool
    challenger: BackendPool | None
    key_source: KeySource
    metrics: dict[Variant, RouteMetrics]
    weight: float = 0.0
    threshold: int = 0
    # Called after every weight change (metrics gauge, persistence).
    on_weight_change: list[Callable[[RouteRuntime], None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def salt(self) -> str:
        return self.config.split.salt

    @property
    def allow_override(self) -> bool:
        return self.config.split.allow_override

    def pool(self, variant: Variant) -> BackendPool:
        if variant is Variant.CHALLENGER and self.challenger is not None:
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
    gauge = metrics.challenger_weight.labels(config.name)
    route.on_weight_change.append(lambda r: gauge.set(r.weight))
    route.set_weight(config.split.challenger_weight)
    return route
