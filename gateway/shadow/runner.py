"""Shadow traffic: mirror a sample of champion-answered requests to a shadow target,
off the response path, and compare its answers with the ones clients got.

Nothing here may slow, fail or alter a client's answer: the proxy only keeps bounded
copies of the request and the answer while they stream, and hands them over once the
client has been answered. Each route's runner bounds its calls in flight; a sample that
finds no room is dropped and counted, so load on a slow shadow never piles up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from gateway.core.compare import Answer, Comparison
from gateway.core.compare import compare as compare_answers
from gateway.core.stats import ShadowOutcome, render_value
from gateway.pipeline.rewrite import rewrite_for
from gateway.pipeline.target import Target
from gateway.shadow.bodies import BoundedCopy, decode_body_off_loop
from gateway.shadow.policy import ShadowPolicy
from gateway.upstream import BackendPool, UpstreamClient, UpstreamError

log = logging.getLogger("gateway.shadow")

# Bodies above this are compared in a worker thread, so a large tensor answer does not
# hold the event loop (and every client request on it) for tens of milliseconds.
_COMPARE_INLINE_BYTES = 64 * 1024
# Smaller answers are compared in batches: up to this many at once (so at most 1 MB held),
# and none waits longer than COMPARE_DELAY. Between client requests, one comparison found
# its code and data gone from the CPU's caches and took about 140 us (a 7-field answer,
# a 2-vCPU VM, under load), where back to back it takes about 20: shadow 10 % went from
# 15.4 % to 11.9-13.1 % of the gateway's requests/s. A full batch holds the event loop
# for about 0.8 ms (32 took 1.5 ms); batches fill only past a few hundred mirrored
# requests a second, below that the timer sends them one or two at a time.
COMPARE_BATCH = 16
COMPARE_DELAY = 0.02
SHADOW_HEADER = "X-Gateway-Shadow"


@dataclass(slots=True)
class MirroredRequest:
    request_id: str
    method: str
    target: Target  # the client's, its path normalised
    route_prefix: str  # what the route matched of it (a backend's path_prefix replaces it)
    headers: list[tuple[str, str]]  # as sent to the champion, without framing
    body: bytes | None  # the client's (a backend's model_name is applied per call)


def _inline(champion: Answer, shadow: Answer) -> bool:
    """Whether the two answers are small enough to compare on the event loop."""
    return len(champion.body) + len(shadow.body) <= _COMPARE_INLINE_BYTES


@dataclass(slots=True)
class _Unsettled:
    """A shadow answer waiting for its comparison (see COMPARE_BATCH)."""

    policy: ShadowPolicy
    request_id: str
    champion: Answer
    shadow: Answer
    latency_delta: float | None  # None: a noise sample (champion against itself)


class ShadowRunner:
    """Runs shadow calls in the background, bounded per route."""

    def __init__(
        self,
        client: UpstreamClient,
        *,
        on_load: Callable[[BackendPool], Callable[[bytes | None], None]] | None = None,
    ) -> None:
        self.client = client
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsettled: list[_Unsettled] = []
        self._settle_timer: asyncio.TimerHandle | None = None
        # Lets the trace writer count shadow calls as load on their target.
        self.on_load = on_load

    @property
    def tasks_in_flight(self) -> int:
        return len(self._tasks)

    @property
    def pending_comparisons(self) -> int:
        return len(self._unsettled)

    def compare_pending(self) -> None:
        """Compare every answer waiting for it and record the outcomes. Anything that
        reads the shadow statistics calls this first, so it never sees them late."""
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        batch, self._unsettled = self._unsettled, []
        for item in batch:
            policy = item.policy
            try:
                comparison = compare_answers(item.champion, item.shadow, policy.settings)
                if item.latency_delta is None:
                    policy.stats.record_noise(comparison)
                else:
                    self._record(policy, item.request_id, comparison, item.latency_delta)
            except Exception:  # one bad answer must not lose the rest of the batch
                log.exception("shadow comparison for route %s failed", policy.route)
                if item.latency_delta is not None:
                    policy.fail(ShadowOutcome.ERROR)

    def submit(
        self,
        policy: ShadowPolicy,
        request: MirroredRequest,
        champion: Answer,
        champion_seconds: float,
        champion_coding: str | None = None,
    ) -> None:
        """Start a shadow call for an answered request, or drop it if the route is full.
        ``champion`` is the answer as the client got it, in ``champion_coding`` (its
        Content-Encoding): it is decoded here, off the response path."""
        if policy.in_flight >= policy.config.max_in_flight:
            policy.fail(ShadowOutcome.DROPPED)
            return
        policy.in_flight += 1
        task = asyncio.create_task(
            self._run(policy, request, champion, champion_seconds, champion_coding)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.compare_pending()  # answers already in are counted, not lost

    async def _run(
        self,
        policy: ShadowPolicy,
        request: MirroredRequest,
        champion: Answer,
        champion_seconds: float,
        champion_coding: str | None = None,
    ) -> None:
        try:
            if champion_coding is not None:
                decoded = await decode_body_off_loop(
                    champion.body, champion_coding, policy.config.max_body_bytes
                )
                if decoded is None:  # too large decoded, or a coding not read here
                    policy.fail(ShadowOutcome.DROPPED)
                    return
                champion = Answer(champion.status, champion.content_type, decoded)
            try:
                shadow, shadow_seconds = await self._call(policy, policy.target, request)
            except TimeoutError:
                policy.fail(ShadowOutcome.TIMEOUT)
                return
            except (UpstreamError, OSError, ValueError):
                policy.fail(ShadowOutcome.ERROR)
                return
            if shadow is None:  # too large, or a content coding we cannot read
                policy.fail(ShadowOutcome.DROPPED)
                return
            if shadow.status >= 500 and champion.status < 500:
                # The shadow failed; that is not a model disagreeing. (Both failing is
                # compared; a 4xx is an answer, so it stays a mismatch.)
                policy.fail(ShadowOutcome.ERROR)
                return
            delta = shadow_seconds - champion_seconds
            if _inline(champion, shadow):
                self._defer(_Unsettled(policy, request.request_id, champion, shadow, delta))
            else:
                comparison = await self._compare_in_thread(policy, champion, shadow)
                self._record(policy, request.request_id, comparison, delta)
            if policy.config.baseline.sample_rate > policy.rng.random():
                await self._noise_sample(policy, request, champion)
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never take the gateway down
            log.exception("shadow call for route %s failed unexpectedly", policy.route)
            policy.fail(ShadowOutcome.ERROR)
        finally:
            policy.in_flight -= 1

    async def _noise_sample(
        self, policy: ShadowPolicy, request: MirroredRequest, champion: Answer
    ) -> None:
        """A second champion call: what the champion disagrees with itself about is noise."""
        try:
            again, _ = await self._call(policy, policy.champion, request)
        except (TimeoutError, UpstreamError, OSError, ValueError):
            return
        if again is None:
            return
        if _inline(champion, again):
            self._defer(_Unsettled(policy, request.request_id, champion, again, None))
        else:
            policy.stats.record_noise(await self._compare_in_thread(policy, champion, again))

    def _defer(self, item: _Unsettled) -> None:
        self._unsettled.append(item)
        if len(self._unsettled) >= COMPARE_BATCH:
            self.compare_pending()
        elif self._settle_timer is None:
            loop = asyncio.get_running_loop()
            self._settle_timer = loop.call_later(COMPARE_DELAY, self.compare_pending)

    def _record(
        self, policy: ShadowPolicy, request_id: str, comparison: Comparison, delta: float
    ) -> None:
        outcome = policy.compared(request_id, comparison, delta)
        if outcome is ShadowOutcome.MISMATCH and policy.config.report.mismatch_log:
            self._log_mismatch(policy, request_id, comparison)

    async def _call(
        self, policy: ShadowPolicy, pool: BackendPool, request: MirroredRequest
    ) -> tuple[Answer | None, float]:
        endpoint = pool.pick()
        if endpoint is None:
            # None in service with a free connection: a shadow call never waits for one
            # (nor takes one that a client's request is waiting for).
            raise UpstreamError("connect", f"backend {pool.name} has no endpoint free")
        endpoint.active += 1  # it holds a connection, under the endpoint's cap
        headers = [*request.headers, (SHADOW_HEADER, "1")]
        rewrite = rewrite_for(request.route_prefix, pool.config)
        target = request.target.upstream if rewrite is None else rewrite.target(request.target)
        sent = request.body
        if rewrite is not None and sent is not None:
            sent = rewrite.body(sent)
        done = self.on_load(pool) if self.on_load is not None else None
        body: bytes | None = None
        started = time.perf_counter()
        try:
            # The shadow's timeout bounds the whole call: nobody is waiting on a stream.
            async with asyncio.timeout(policy.timeout_seconds):
                response = await self.client.request(
                    endpoint.origin,
                    request.method,
                    endpoint.target(target),
                    headers,
                    sent,
                    connect_timeout=pool.connect_timeout_seconds,
                    read_timeout=policy.timeout_seconds,
                )
                copy = BoundedCopy(policy.config.max_body_bytes)
                try:
                    async for chunk in response.chunks():
                        copy.feed(chunk)
                        if copy.overflowed:
                            break
                finally:
                    if copy.overflowed:
                        response.close()
                    else:
                        response.release()
            seconds = time.perf_counter() - started
            raw = copy.value()
            if raw is None:
                return None, seconds
            body = raw
            decoded = await decode_body_off_loop(
                raw, response.header("Content-Encoding"), policy.config.max_body_bytes
            )
            if decoded is None:
                return None, seconds
            return Answer(response.status, response.header("Content-Type") or "", decoded), seconds
        finally:
            if pool.waiting:
                pool.release(endpoint)
            else:
                endpoint.active -= 1
            if done is not None:
                done(body)

    async def _compare_in_thread(
        self, policy: ShadowPolicy, champion: Answer, shadow: Answer
    ) -> Comparison:
        return await asyncio.to_thread(compare_answers, champion, shadow, policy.settings)

    def _log_mismatch(self, policy: ShadowPolicy, request_id: str, comparison: Comparison) -> None:
        path = policy.config.report.mismatch_log
        assert path is not None
        fields = [
            {
                "path": f.path,
                "reason": f.reason.value,
                "champion": render_value(f.champion, 512),
                "shadow": render_value(f.shadow, 512),
            }
            for f in comparison.mismatches[:32]
        ]
        line = orjson.dumps(
            {"ts": time.time(), "route": policy.route, "request_id": request_id, "fields": fields}
        )
        try:
            with open(path, "ab") as handle:
                handle.write(line + b"\n")
        except OSError as error:
            log.warning("cannot append to mismatch log %s: %s", path, error)
