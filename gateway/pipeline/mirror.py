"""Step 6, Shadow: decided when the request arrives, run once the client has its answer.

Only requests the champion answers are mirrored (the challenger's own answers are not
what a shadow is compared against). While the request and the answer stream, a
``Mirror`` keeps bounded copies of both; once the answer went out whole, it hands them
to the shadow runner, which calls the shadow target off the response path. Nothing here
can delay, fail or alter what the client gets.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.core.compare import Answer
from gateway.core.stats import ShadowOutcome
from gateway.pipeline.target import Target, parse_target
from gateway.runtime import RouteRuntime
from gateway.shadow import (
    BoundedCopy,
    MirroredRequest,
    ShadowPolicy,
    ShadowRunner,
    tee_stream,
)
from gateway.upstream import UpstreamResponse


def sample(
    route: RouteRuntime, request: web.BaseRequest, request_id: str, runner: ShadowRunner
) -> Mirror | None:
    """A Mirror if this (champion-answered) request is to be mirrored, else None."""
    policy = route.shadow
    if policy is None:
        return None
    key = request_id
    if policy.config.sampling == "key":  # the same users (sessions, ...) every time
        key = route.key_source.extract(request, request_id)
    if not policy.samples(request.method, key):
        return None
    if policy.in_flight >= policy.config.max_in_flight:
        # No room now; copying bodies for a sample that will be dropped is waste.
        policy.fail(ShadowOutcome.DROPPED)
        return None
    return Mirror(policy, runner)


class Mirror:
    """One mirrored exchange: the bounded copies of its request and answer bodies."""

    __slots__ = ("answer_copy", "policy", "request_body", "request_copy", "runner")

    def __init__(self, policy: ShadowPolicy, runner: ShadowRunner) -> None:
        self.policy = policy
        self.runner = runner
        self.request_body: bytes | None = None  # a body read whole
        self.request_copy: BoundedCopy | None = None  # or one copied as it streams
        self.answer_copy: BoundedCopy | None = None

    def tee(self, source: AsyncIterator[bytes], length: int | None) -> AsyncIterator[bytes] | None:
        """``source`` with a copy kept on the way through; None (and the sample dropped)
        when a declared length is past what a shadow takes."""
        limit = self.policy.config.max_body_bytes
        if length is not None and length > limit:
            self.policy.fail(ShadowOutcome.DROPPED)
            return None
        copy = self.request_copy = BoundedCopy(limit)
        return tee_stream(source, copy)

    def copy_answer(self) -> BoundedCopy:
        copy = self.answer_copy = BoundedCopy(self.policy.config.max_body_bytes)
        return copy

    def submit(
        self,
        request: web.BaseRequest,
        request_id: str,
        headers: list[tuple[str, str]],
        upstream: UpstreamResponse,
        started: float,
        target: Target | None = None,
        route_prefix: str = "/",
    ) -> None:
        """The client got the whole answer: send the copies to the shadow runner (which
        undoes the answer's content coding, off the response path)."""
        policy = self.policy
        body = self.request_body
        if body is None and self.request_copy is not None:
            body = self.request_copy.value()
            if body is None:
                policy.fail(ShadowOutcome.DROPPED)
                return
        answer = self.answer_copy.value() if self.answer_copy is not None else None
        if answer is None:
            policy.fail(ShadowOutcome.DROPPED)
            return
        if target is None:
            target = parse_target(request.raw_path)
        coding = upstream.header("Content-Encoding")
        self.runner.submit(
            policy,
            MirroredRequest(request_id, request.method, target, route_prefix, headers, body),
            Answer(upstream.status, upstream.header("Content-Type") or "", answer),
            time.perf_counter() - started,
            None if coding is None or coding.strip().lower() in ("", "identity") else coding,
        )
