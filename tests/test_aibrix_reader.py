"""AIBrix's own GatewayLoadReader reads what the trace writer wrote.

The reader hard-codes the ``aibrix:`` key prefix, so this test writes under ``aibrix``
on the shared Redis with a model name nobody else uses, and deletes its keys after.
"""

from __future__ import annotations

import hashlib
import logging
import types
from pathlib import Path

import pytest
import redis

from gateway.tracing import TraceWriter
from tests.aibrix.fixtures import aibrix_model, forget_writer, load_reader  # noqa: F401  (fixtures)
from tests.aibrix.loader import COPY, MODULE_SHA256, load_reader_module
from tests.helpers.clock import FakeClock
from tests.redis_fixtures import SHARED_REDIS_URL, fast_client
from tests.trace_support import flush_after, serve

INTERVAL = 10
T0 = 1_700_000_000  # a window start; the clock is driven, Redis TTLs stay relative


async def test_gateway_load_reader_reads_our_windows(
    load_reader: types.ModuleType,  # noqa: F811
    aibrix_model: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = aibrix_model
    client = fast_client(SHARED_REDIS_URL)
    clock = FakeClock(T0 + 1.0)
    w = TraceWriter(client, key_prefix="aibrix", interval_seconds=INTERVAL, ttl_seconds=600,
                    clock=clock)
    e1, e2, e3 = T0 + 10, T0 + 20, T0 + 30
    try:
        # Window 1: 3 x (100 in, 20 out), 1 x (1000, 1000), one still open at its end.
        serve(w, clock, 3, model, (100, 20), each=0.01)
        serve(w, clock, 1, model, (1000, 1000), each=0.01)
        straddler = w.add(model)
        assert await flush_after(w, clock, e1)
        # Window 2: the open one finishes (8, 8); two more arrive and finish (2, 3).
        w.done(straddler, 8, 8)
        serve(w, clock, 2, model, (2, 3), each=0.01)
        assert await flush_after(w, clock, e2)

        sync = redis.Redis.from_url(SHARED_REDIS_URL)
        reader = load_reader.GatewayLoadReader(sync, model)
        with caplog.at_level(logging.WARNING):
            # First read: the reader scans every window it finds for the model.
            records, rate = reader.read(e2 + 0.5)
            assert sorted(records) == sorted([
                (e1, 66 / 10, 43 / 10, 3),
                (e1, 100 / 10, 100 / 10, 1),
                (e2, 30 / 10, 30 / 10, 1),
                (e2, 10 / 10, 16 / 10, 2),
            ])
            assert [r.freq for r in records if r.ts == e1] == [1, 3]  # sorted-key order
            # Rate is the last window's arrivals (meta_total_reqs) over the interval.
            assert rate == 2 / INTERVAL
            assert reader.key_ts_alignment == INTERVAL  # taken from meta_interval_sec

            # Window 3, read the way the GPU optimizer polls: just after the boundary.
            serve(w, clock, 4, model, (64, 128), each=0.01)
            assert await flush_after(w, clock, e3)
            records, rate = reader.read(e3 + 0.7)
            assert list(records) == [(e3, 60 / 10, 70 / 10, 4)]
            assert rate == 4 / INTERVAL
            assert reader.read(e3 + 5) == ([], 0.0)  # already seen

            # Its private parser agrees on totals and pending for window 1.
            profile = reader.read_key(f"aibrix:{model}_request_trace_{e1}", False)
            _, total, pending = reader._parse_profiles(profile, e1)
            assert (total, pending) == (5, 1)
        # The reader logs a warning for anything it cannot parse; there must be none.
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        sync.close()
    finally:
        await client.aclose()
        forget_writer(w.writer_id)


def test_the_copy_is_aibrix_own_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    assert hashlib.sha256(COPY.read_bytes()).hexdigest() == MODULE_SHA256
    assert COPY.read_text().startswith("# Copyright 2024 The Aibrix Team.")
    assert (COPY.parent / "LICENSE").read_text().lstrip().startswith("Apache License")
    changed = tmp_path / "load_reader.py"
    changed.write_bytes(COPY.read_bytes() + b"\n# changed\n")
    with pytest.raises(RuntimeError, match="the copy was changed"):
        load_reader_module(changed)
