"""Ports handed to servers started in other processes (tests, the benchmark harness)."""

from __future__ import annotations

import random
import socket

import pytest

from tests.helpers import ports
from tests.helpers.ports import free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    # The kernel's own port-0 choice repeats in two calls in a row about once in 15,000
    # pairs; these may never repeat.
    handed = [free_port() for _ in range(2_000)]
    assert len(set(handed)) == len(handed)
    start = ports._ephemeral_start()
    assert all(ports._LOWEST <= port < start for port in handed)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", handed[-1]))  # still free once handed out


class _Scripted(random.Random):
    """Draws the given ports in order."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__()
        self.draws = draws

    def randrange(self, *_: object, **__: object) -> int:  # type: ignore[override]
        return self.draws.pop(0)


def test_a_port_in_use_or_handed_out_before_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        in_use = held.getsockname()[1]
        spare = free_port()  # free, and now known to this process: drawn, then released
        ports._handed_out.discard(spare)
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 65_536)
        monkeypatch.setattr(ports, "_draw", _Scripted([in_use, given, spare]))
        assert free_port() == spare


def test_without_room_below_the_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_range_start = ports._ephemeral_start()
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: ports._LOWEST + 10)
    handed = [free_port() for _ in range(50)]
    assert len(set(handed)) == 50
    # None drawn below the (pretended) range: all are the kernel's, from its real range.
    assert all(port >= kernel_range_start for port in handed)
