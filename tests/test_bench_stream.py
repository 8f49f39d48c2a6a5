"""The stream mode of the benchmark (``bench.stream``) still runs end to end: its SSE
upstream driven directly by its client, then one tiny round through every proxy that is
installed and the stalled-reader check (figures unchecked: this is not a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.nginx import nginx_binary
from tests.redis_fixtures import SHARED_REDIS_URL as REDIS_URL

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(90)


def test_upstream_driven_directly_sends_every_chunk_on_time() -> None:
    from tests.helpers.ports import free_port

    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.stream_upstream", "--port", str(port)], cwd=REPO
    )
    try:
        client = [sys.executable, "-m", "bench.stream_client", "--ramp", "0.1"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(50):  # until it listens
            done = subprocess.run(
                [*client, "--url", url, "--streams", "30", "--chunks", "8",
                 "--interval-ms", "20"],
                cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            result = json.loads(done.stdout)
            if not result["errors"]:
                break
        assert result["complete"] == 30, result
        assert result["chunks"] == result["expected_chunks"] == 30 * 9
        assert result["usage_chunks"] == 30
        # Time to first chunk is about one interval: the chunks are paced, not bunched.
        assert 15 <= result["ttfc_ms"]["p50"] < 200, result
    finally:
        upstream.terminate()
        upstream.wait(10)


def test_stream_mode_runs_through_every_proxy(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    only = "direct,baseline,gateway" + (",nginx" if nginx_binary() else "")
    done = subprocess.run(
        [sys.executable, "-m", "bench.stream", "--sizes", "20", "--rounds", "1",
         "--chunks", "5", "--interval-ms", "20", "--only", only, "--slow-streams", "3",
         "--slow-bytes", str(4 * 2**20), "--hold", "1.5", "--redis-url", REDIS_URL,
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    targets = {run["target"] for run in data["runs"]}
    assert targets == set(only.split(","))
    for run in data["runs"]:
        assert run["complete"] == 20, run
        assert run["chunks"] == run["expected_chunks"], run
    assert data["slow"]["gateway_rss_growth_mb"] is not None
    assert "| 20 | gateway |" in done.stdout


def test_paired_mode_runs_two_gateways_at_once() -> None:
    """``bench.stream_paired`` against this same checkout: both complete every stream
    and a ratio is printed (its value unchecked: this is not a benchmark)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.stream_paired", "--reference", str(REPO),
         "--streams", "10", "--chunks", "5", "--interval-ms", "20", "--ramp", "0.2",
         "--rounds", "1", "--redis-url", REDIS_URL],
        cwd=REPO, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 0: whole " in done.stdout
    assert "this checkout / reference, median" in done.stdout
