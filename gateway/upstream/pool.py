"""Backend pools: endpoints, load balancing and passive outlier ejection.

A pool only *chooses*; the proxy does the I/O with the one shared ``UpstreamClient`` and
reports each attempt's outcome back, which is what ejection decides on.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yarl import URL

from gateway.config import BackendConfig
from gateway.upstream.client import Origin

# An endpoint that fails to connect this many times in a row is taken out of rotation
# for EJECTION_SECONDS (Envoy's consecutive_gateway_failure, simplified).
EJECT_AFTER_FAILURES = 5
EJECTION_SECONDS = 10.0

_random = random.random


@dataclass(slots=True)
class Endpoint:
    base: str
    origin: Origin = field(init=False)
    # The base URL's own path ("" or e.g. "/serving"), prefixed to every request target.
    base_path: str = field(init=False)
    active: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0

    def __post_init__(self) -> None:
        url = URL(self.base)
        self.origin = _shared_origin(url.scheme, url.raw_host or "", url.explicit_port)
        self.base_path = url.raw_path.rstrip("/")

    def target(self, raw_path: str) -> str:
        """The request target: raw_path is kept byte-exact, as the client encoded it."""
        return self.base_path + raw_path


# Endpoints at one address share its Origin (immutable). With many routes over the same
# servers (100 routes x 2 backends x 8 endpoints), a request then reads one of a few
# warm objects instead of one of 1,600 gone cold in the CPU's caches since its last use.
@functools.lru_cache(maxsize=4096)
def _shared_origin(scheme: str, host: str, port: int | None) -> Origin:
    return Origin.parse(scheme, host, port)


@dataclass(slots=True)
class BackendPool:
    name: str
    model: str
    endpoints: list[Endpoint]
    strategy: str
    # Longest wait for the answer's head and, once it streams, between two chunks: a
    # long LLM stream that keeps flowing is never cut.
    timeout_seconds: float
    connect_timeout_seconds: float
    clock: Callable[[], float] = time.monotonic
    # What the pool was built from: a reload that leaves it equal keeps the pool.
    config: BackendConfig | None = None
    _next: int = field(default=0)

    @classmethod
    def from_config(
        cls, name: str, config: BackendConfig, clock: Callable[[], float] = time.monotonic
    ) -> BackendPool:
        return cls(
            name=name,
            model=config.model or name,
            endpoints=[Endpoint(url) for url in config.urls],
            strategy=config.load_balancing,
            timeout_seconds=config.timeout_seconds,
            connect_timeout_seconds=config.connect_timeout_seconds,
            clock=clock,
            config=config,
        )

    def pick(self) -> Endpoint | None:
        """The endpoint for the next request, or None when every endpoint is ejected."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            only = endpoints[0]
            # A lone endpoint is never ejected: there is nowhere better to send the request,
            # and refusing it would only hide that the backend came back.
            return only
        if self.strategy == "round_robin":
            # No list per request: step to the next endpoint that is not ejected. The clock
            # is read only for an endpoint under ejection (see _back_in_service).
            count = len(endpoints)
            for _ in range(count):
                self._next = (self._next + 1) % count
                endpoint = endpoints[self._next]
                if endpoint.ejected_until == 0.0 or self._back_in_service(endpoint):
                    return endpoint
            return None
        # random and least_request draw from all endpoints, in O(1), as long as the drawn
        # ones are in service; otherwise they draw again from the healthy endpoints.
        count = len(endpoints)
        i = int(_random() * count)  # random() < 1, so i < count
        first = endpoints[i]
        if self.strategy == "random":
            if first.ejected_until == 0.0 or self._back_in_service(first):
                return first
            return self._pick_healthy()
        # least_request as Envoy does it: the less busy of two distinct random endpoints.
        # Ties spread evenly, and no endpoint takes every new request while it looks idle.
        j = int(_random() * (count - 1))  # uniform over the other count - 1
        second = endpoints[j + 1 if j >= i else j]
        if (first.ejected_until == 0.0 or self._back_in_service(first)) and (
            second.ejected_until == 0.0 or self._back_in_service(second)
        ):
            return first if first.active <= second.active else second
        return self._pick_healthy()

    def _back_in_service(self, endpoint: Endpoint) -> bool:
        """Whether an ejected endpoint's ejection is over. Once it is, it is cleared, so
        picking the endpoint needs no clock read again until its next ejection."""
        if endpoint.ejected_until <= self.clock():
            endpoint.ejected_until = 0.0
            return True
        return False

    def _pick_healthy(self) -> Endpoint | None:
        healthy = [
            e for e in self.endpoints if e.ejected_until == 0.0 or self._back_in_service(e)
        ]
        if not healthy:
            return None
        if self.strategy == "random" or len(healthy) == 1:
            return random.choice(healthy)
        first, second = random.sample(healthy, 2)
        return first if first.active <= second.active else second

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def failed(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures >= EJECT_AFTER_FAILURES and len(self.endpoints) > 1:
            endpoint.ejected_until = self.clock() + EJECTION_SECONDS
            endpoint.consecutive_failures = 0


def build_pools(
    backends: Mapping[str, BackendConfig],
    previous: Mapping[str, BackendPool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, BackendPool]:
    """A pool per backend. A backend whose config a reload left as it was keeps its pool
    (the same object), and with it the endpoints' ejections and the balancing position."""
    previous = previous or {}
    pools: dict[str, BackendPool] = {}
    for name, config in backends.items():
        kept = previous.get(name)
        if kept is not None and kept.config == config:
            pools[name] = kept
        else:
            pools[name] = BackendPool.from_config(name, config, clock)
    return pools
