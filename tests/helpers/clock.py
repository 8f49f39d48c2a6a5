"""A clock the test moves by hand, for code that takes its time source as an argument
(the state store's TTLs, the trace writer's windows, the backend pools' ejections)."""

from __future__ import annotations


class FakeClock:
    """Call it for the time; set ``now`` or ``advance`` it to move time."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; returns the new time."""
        self.now += seconds
        return self.now
