"""Gateway config documents for each benchmarked feature set.

Champion and challenger point at the same canned upstream, so the feature sets differ
only in what the gateway does per request, never in what the upstream costs. The shadow
target is the upstream's challenger port: same cost, an answer that differs a little.

Every gateway with Redis state gets key prefixes of its own (``Listen``): gateways
benchmarked at the same time must not see each other's writes (a canary writes its
status and counts every second, and every write to a shared prefix would wake the other
gateway's steering watcher), and the harness deletes exactly its own keys afterwards.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROUTE_PREFIX = "/v1/models/bench"
REQUEST_PATH = ROUTE_PREFIX + ":predict"


class Feature(enum.Enum):
    PLAIN = "plain"
    SPLIT = "split"
    TRACES = "traces"
    SHADOW = "shadow"
    CANARY = "canary"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def split(self) -> bool:
        return self is not Feature.PLAIN

    @property
    def traces(self) -> bool:
        return self in (Feature.TRACES, Feature.SHADOW, Feature.CANARY)

    @property
    def shadow(self) -> bool:
        return self is Feature.SHADOW

    @property
    def canary(self) -> bool:
        """A running canary: configured here, started through the admin API once the
        gateway is up (``bench.context.start_canaries``)."""
        return self is Feature.CANARY

    @property
    def needs_redis(self) -> bool:
        return self.traces


_LABELS = {
    Feature.PLAIN: "gateway: routing only",
    Feature.SPLIT: "gateway: split 50%",
    Feature.TRACES: "gateway: split + Redis traces",
    Feature.SHADOW: "gateway: split + traces + shadow 10%",
    Feature.CANARY: "gateway: split + traces + canary holding at 50%",
}

SHADOW_RATE = 0.1
SPLIT_WEIGHT = 0.5
# The canary cell: one step at the split's own weight, so the canary changes nothing in
# where requests go, and a minimum of requests per step no run reaches, so it holds at
# that step however long the run (no advance, no promotion, no weight change). It is
# evaluated every second, the most often a canary is configured in earnest, so its
# per-second work (reading, summing and writing counts in the store) is as large as it
# gets; none of it should be per request.
CANARY: dict[str, Any] = {
    "steps": [SPLIT_WEIGHT],
    "min_requests": 1_000_000_000,
    "evaluation_interval_seconds": 1,
}


@dataclass(frozen=True, slots=True)
class Listen:
    port: int
    admin_port: int
    state_path: Path
    redis_url: str
    trace_prefix: str

    @property
    def state_prefix(self) -> str:
        """The state store's ``key_prefix`` (its keys are ``<this>:state:...``): this
        gateway's own, and never matched by the trace keys' glob ``<trace_prefix>:*``."""
        return f"{self.trace_prefix}-store"


def _sections(feature: Feature, listen: Listen) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": listen.port, "drain_timeout_seconds": 2},
        "admin": {"host": "127.0.0.1", "port": listen.admin_port},
    }
    if feature.traces:
        sections["state"] = {
            "backend": "redis",
            "redis_url": listen.redis_url,
            "key_prefix": listen.state_prefix,
        }
        sections["tracing"] = {
            "enabled": True,
            "interval_seconds": 10,
            # A prefix of its own, so the harness can find (and delete) exactly its keys.
            "key_prefix": listen.trace_prefix,
            "ttl_seconds": 600,
        }
    else:
        sections["state"] = {"backend": "embedded", "path": str(listen.state_path)}
        sections["tracing"] = {"enabled": False}
    return sections


def _backend(urls: list[str]) -> dict[str, Any]:
    return {"url": urls[0]} if len(urls) == 1 else {"endpoints": urls}


def feature_document(
    feature: Feature, listen: Listen, upstream_urls: list[str], shadow_url: str | None = None
) -> dict[str, Any]:
    """One route; champion and challenger are the same upstream."""
    return scale_document(feature, listen, upstream_urls, routes=1, shadow_url=shadow_url)


def scale_document(
    feature: Feature,
    listen: Listen,
    upstream_urls: list[str],
    routes: int,
    shadow_url: str | None = None,
) -> dict[str, Any]:
    """``routes`` routes, each with its own champion/challenger (and shadow) backends of
    ``len(upstream_urls)`` endpoints: one model per route, as a real deployment grows.
    The shadow backend is ``shadow_url`` (default: the upstream)."""
    backends: dict[str, Any] = {}
    route_docs: list[dict[str, Any]] = []
    for i in range(routes):
        name = "bench" if routes == 1 else f"bench{i}"
        backends[f"{name}-v1"] = _backend(upstream_urls)
        route: dict[str, Any] = {
            "name": name,
            "match": {"path_prefix": route_prefix(i, routes)},
            "champion": f"{name}-v1",
        }
        if feature.split:
            backends[f"{name}-v2"] = _backend(upstream_urls)
            route["challenger"] = f"{name}-v2"
            route["split"] = {"challenger_weight": SPLIT_WEIGHT}
        if feature.shadow:
            backends[f"{name}-shadow"] = _backend(
                [shadow_url] if shadow_url is not None else upstream_urls
            )
            route["shadow"] = {"target": f"{name}-shadow", "sample_rate": SHADOW_RATE}
        if feature.canary:
            route["canary"] = dict(CANARY)
        route_docs.append(route)
    return {**_sections(feature, listen), "backends": backends, "routes": route_docs}


def route_names(document: dict[str, Any]) -> tuple[str, ...]:
    return tuple(route["name"] for route in document["routes"])


def route_prefix(index: int, routes: int) -> str:
    return ROUTE_PREFIX if routes == 1 else f"{ROUTE_PREFIX}{index}"


def request_paths(routes: int, active: int | None = None) -> tuple[str, ...]:
    """One path per route, for the first ``active`` routes (default all of them)."""
    # bench1 is a prefix of bench10's path too; longest prefix wins, as it must in the
    # gateway, and the unequal prefix lengths keep the router's real lookup cost in view.
    count = routes if active is None else active
    return tuple(route_prefix(i, routes) + ":predict" for i in range(count))


class ScaleCell(NamedTuple):
    """A config of ``routes`` routes with ``endpoints`` endpoints per backend, loaded on
    its first ``active`` routes.

    Two questions hide in "does the cost grow with routes": whether the work per request
    grows with the size of the config (it should not: one route among 100 configured,
    ``100x8:1``), and what it costs when traffic is spread over all of them (``100x8``),
    where every request touches another route's objects and the CPU's caches hold less
    of each.
    """

    routes: int
    endpoints: int
    active: int

    @property
    def name(self) -> str:
        size = f"{self.routes}x{self.endpoints}"
        return size if self.active == self.routes else f"{size}:{self.active}"

    @property
    def label(self) -> str:
        size = f"{self.routes} routes x {self.endpoints} endpoints"
        if self.active == self.routes:
            return size
        return f"{size}, traffic on {self.active} route{'s' if self.active > 1 else ''}"

    @property
    def spread(self) -> bool:
        """Traffic on more than one route of a many-route config. Issue 5's item 4 ("cost
        must not grow with them") is judged on the config's size, with the traffic on one
        route; spread traffic adds what many models' objects cost in the CPU's caches,
        which every proxy pays (nginx laid out the same way far more: README,
        "Performance"), so such cells are reported beside it, not judged."""
        return self.active > 1

    @property
    def paths(self) -> tuple[str, ...]:
        return request_paths(self.routes, self.active)


def write(document: dict[str, Any], path: Path) -> Path:
    path.write_text(
        "# generated by bench/gateway_configs.py\n" + yaml.safe_dump(document, sort_keys=False)
    )
    return path
