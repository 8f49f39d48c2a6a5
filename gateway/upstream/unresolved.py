"""A pool with no endpoint, for a registry reference that points nowhere (no such
model, alias or version yet): every request gets 503 ``no_healthy_endpoint`` saying why."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.upstream.pool import BackendPool, Endpoint, NoHealthyEndpoint


@dataclass(slots=True, eq=False)
class UnresolvedPool(BackendPool):
    # Why nothing serves it, for the client's error and the route view.
    problem: str = ""

    async def acquire(self) -> Endpoint:
        raise NoHealthyEndpoint(self.problem)


def unresolved_pool(name: str, problem: str) -> UnresolvedPool:
    return UnresolvedPool(
        name=name, model=name, endpoints=[], strategy="round_robin",
        timeout_seconds=30.0, connect_timeout_seconds=5.0, problem=problem,
    )  # fmt: skip
