"""Steps 2 and 3, Key and Split: the sticky key of a request and the variant it goes to.

``split.key`` is parsed once at load into a ``KeySource``; per request the key is read
and hashed (``gateway.core.split``, the published rule) against the route's live
threshold, which the steering owner keeps current.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.core.split import CHAMPION, Variant, bucket_of, choose, parse_override
from gateway.pipeline.errors import VARIANT_HEADER as VARIANT_HEADER

if TYPE_CHECKING:
    from gateway.runtime import RouteRuntime


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
            # The usual key: one object for every route, so it stays in cache.
            return REQUEST_ID_KEY
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


REQUEST_ID_KEY = KeySource(KeyKind.REQUEST_ID)


def choose_variant(route: RouteRuntime, request: web.BaseRequest, request_id: str) -> Variant:
    """The variant that answers this request: a forced one where the route allows the
    override header, otherwise the one its key's bucket falls on."""
    if route.allow_override:
        forced = parse_override(request.headers.get(VARIANT_HEADER))
        if forced is not None and (forced is CHAMPION or route.has_challenger):
            return forced
    cut = route.threshold
    if cut <= 0:
        return CHAMPION
    key = route.key_source.extract(request, request_id)
    return choose(bucket_of(key, route.salt), cut)
