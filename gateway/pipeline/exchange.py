"""One request's way through the pipeline, once its route and variant are known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.core.usage import NO_USAGE, TokenCounts
from gateway.pipeline.body import HeldBody
from gateway.pipeline.target import Target
from gateway.runtime import Lane, LoadTrace, RouteRuntime

if TYPE_CHECKING:
    from gateway.pipeline.mirror import Mirror


@dataclass(slots=True)
class Exchange:
    request: web.BaseRequest
    request_id: str
    route: RouteRuntime
    lane: Lane  # the variant's pool, metrics and trace
    started: float  # perf_counter() at arrival
    # The whole request body, when it was read at once (to match on its model, or small
    # enough to send in one write); None while it streams.
    body: bytes | None = None
    target: Target | None = None  # the request target, its path normalised
    path: str = ""  # the request target sent upstream (the backend's path_prefix applied)
    # Body bytes held in memory against the buffer budget (all of the body, or its start
    # when the rest streams), released when the exchange ends.
    held: HeldBody | None = None
    mirror: Mirror | None = None  # set when a copy goes to the shadow afterwards
    trace: LoadTrace | None = None  # the backend model's load trace, when traces are on
    tokens: TokenCounts = NO_USAGE  # (prompt, completion) from a streamed answer's usage
    answer: bytes | None = None  # or the whole answer, when traced: its trace reads usage
    answered: bool = False  # the backend sent an answer (its headers at least)
    finished: float = 0.0  # perf_counter() when the answer was relayed, if it was
