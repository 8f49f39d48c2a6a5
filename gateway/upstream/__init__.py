"""The upstream side: backend pools (endpoints, balancing, connection caps, health), the
lean HTTP/1.1 client that talks to them, and the active health checker."""

from __future__ import annotations

from gateway.upstream.client import (
    BodySource,
    ConnectError,
    ConnectTimeout,
    Origin,
    StaleConnection,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.upstream.pool import (
    BackendPool,
    Endpoint,
    NoHealthyEndpoint,
    UpstreamOverloaded,
    build_pools,
)

__all__ = [
    "BackendPool",
    "BodySource",
    "ConnectError",
    "ConnectTimeout",
    "Endpoint",
    "NoHealthyEndpoint",
    "Origin",
    "StaleConnection",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamOverloaded",
    "UpstreamResponse",
    "UpstreamTimeout",
    "build_pools",
]
