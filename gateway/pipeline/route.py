"""Step 1, Route: the route a request belongs to.

The router is built once from the config; per request it costs a few dict lookups.
Matching is separate from handling (Starlette's ``matches`` before any I/O): the proxy
asks for the candidate routes of a path, reads the body only if one of them needs the
JSON ``model`` field, then selects the route. ``Router.select`` is the same choice in one
call, for callers that have the body's model at hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.core.jsonbody import body_model as body_model

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RouteMatcher(Generic[T]):
    """One route's match conditions, carrying whatever the caller attaches as ``target``."""

    path_prefix: str
    target: T
    model: str | None = None
    header_name: str | None = None
    header_value: str | None = None

    @property
    def needs_body(self) -> bool:
        return self.model is not None

    def accepts(self, headers: Mapping[str, str], body_model: str | None) -> bool:
        if self.header_name is not None and headers.get(self.header_name) != self.header_value:
            return False
        return self.model is None or self.model == body_model


@dataclass(frozen=True, slots=True)
class Candidates(Generic[T]):
    """The routes whose prefix matches a path, most specific first."""

    matchers: tuple[RouteMatcher[T], ...]
    needs_body: bool

    def select(self, headers: Mapping[str, str], body_model: str | None) -> T | None:
        for matcher in self.matchers:
            if matcher.accepts(headers, body_model):
                return matcher.target
        return None


@dataclass(frozen=True, slots=True)
class PathMatch(Generic[T]):
    """Every prefix group matching one path, longest prefix first.

    Shorter prefixes are kept as fallbacks: a request for ``/v1/chat`` whose body names a
    model no ``/v1/chat`` route serves may still belong to a ``/v1`` route.
    """

    groups: tuple[Candidates[T], ...]
    needs_body: bool  # some group matches on the body's model: read the body first
    # The route when the path alone decides it: the most specific group's first route has
    # no condition, so it takes every request (the usual one route per path). The proxy
    # then skips the groups, and touches one object per path instead of five.
    only: T | None = None

    def select(self, headers: Mapping[str, str], body_model: str | None) -> T | None:
        """The route for a request with these headers and body ``model`` (None: the body
        names none, or was not read because ``needs_body`` is false)."""
        if self.only is not None:
            return self.only
        for group in self.groups:
            target = group.select(headers, body_model)
            if target is not None:
                return target
        return None


# Distinct paths whose matches are remembered. A gateway sees few distinct paths (one per
# model and verb); should it see more (IDs in paths, a scan), the memory starts over
# when full, so it never grows past this.
PATH_CACHE_SIZE = 4096


class Router(Generic[T]):
    """Longest ``path_prefix`` wins; among equal prefixes, routes with more conditions
    (model, header) are tried first, then config order.

    A prefix matches at a segment boundary (``gateway.core.paths.prefix_matches``):
    ``/v2/models/iris`` matches ``/v2/models/iris/infer`` but not ``/v2/models/iris-v1``,
    and ``/v1/models/sentiment`` matches TF Serving's ``/v1/models/sentiment:predict``.
    Paths are matched as given: the proxy hands it normalised ones.
    """

    def __init__(self, matchers: Sequence[RouteMatcher[T]]) -> None:
        by_prefix: dict[str, list[RouteMatcher[T]]] = {}
        for matcher in matchers:
            by_prefix.setdefault(matcher.path_prefix, []).append(matcher)
        self._by_prefix: dict[str, Candidates[T]] = {}
        for prefix, group in by_prefix.items():
            # sorted() is stable, so config order breaks ties.
            ordered = sorted(group, key=lambda m: -_specificity(m))
            self._by_prefix[prefix] = Candidates(tuple(ordered), any(m.needs_body for m in group))
        # Checking each distinct prefix length, longest first, costs at most one dict
        # lookup per length, however many routes there are.
        self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)
        self._matches: dict[str, PathMatch[T]] = {}

    def select(
        self, path: str, headers: Mapping[str, str], body_model: str | None = None
    ) -> T | None:
        """The route for a request: its path, headers and its JSON body's ``model``."""
        return self.match(path).select(headers, body_model)

    def match(self, path: str) -> PathMatch[T]:
        """The prefix groups matching ``path``: one dict lookup for a path seen before."""
        found = self._matches.get(path)
        if found is None:
            found = self._match(path)
            if len(self._matches) >= PATH_CACHE_SIZE:
                self._matches.clear()
            self._matches[path] = found
        return found

    def _match(self, path: str) -> PathMatch[T]:
        groups: list[Candidates[T]] = []
        path_length = len(path)
        for length in self._lengths:
            if length <= path_length:
                prefix = path[:length]
                group = self._by_prefix.get(prefix)
                if group is not None and (
                    length == path_length or prefix[-1] == "/" or path[length] in "/:"
                ):
                    groups.append(group)
        only = None
        if groups:
            first = groups[0].matchers[0]
            if first.model is None and first.header_name is None:
                only = first.target
        return PathMatch(tuple(groups), any(group.needs_body for group in groups), only)


def _specificity(matcher: RouteMatcher[Any]) -> int:
    return (matcher.model is not None) + (matcher.header_name is not None)

