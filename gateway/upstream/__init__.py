"""The upstream side: backend pools (endpoints, balancing, ejection) and the lean HTTP/1.1
client that talks to them."""

from __future__ import annotations

from gateway.upstream.client import (
    BodySource,
    Origin,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.upstream.pool import BackendPool, Endpoint, build_pools

__all__ = [
    "BackendPool",
    "BodySource",
    "Endpoint",
    "Origin",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "build_pools",
]
