"""The benchmark harness still runs end to end (it is not a benchmark: figures unchecked).

One feature set, one round, one-second cells. Works without wrk or nginx: the harness
falls back to its Python upstream and client, and the second test forces that path so it
stays working on machines that have both. The canary cell needs Redis (the suite's, see
tests/redis_fixtures.py; the harness uses key prefixes of its own) and is skipped without
it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.nginx import nginx_binary
from tests.redis_fixtures import SHARED_REDIS_URL as REDIS_URL

REPO = Path(__file__).resolve().parent.parent


needs_redis = pytest.mark.redis  # skipped where redis-server is missing (tests/conftest.py)


def bench_process(
    tmp_path: Path, *args: str, timeout: float = 60
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """One ``bench.run`` in a child process: its JSON results and the process."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--rounds=1",
        "--warmup=0",
        # Never wait on or repeat runs for other processes: figures are not checked here.
        "--quiet-wait=0",
        "--retries=0",
        f"--json={out}",
        *args,
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result, done


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """The comparison table's run."""
    result, done = bench_process(tmp_path, *args)
    assert "| target |" in done.stdout
    return result


def assert_served(result: dict[str, Any], names: list[str]) -> None:
    assert sorted(result["summaries"]) == sorted(names)
    for name in names:
        summary = result["summaries"][name]
        assert summary["rps"] > 0, name
        assert summary["errors"] == 0, name
        assert summary["non_2xx"] == 0, name


@pytest.mark.timeout(60)
def test_harness_runs_with_the_tools_at_hand(tmp_path: Path) -> None:
    """wrk and nginx when installed, the fallbacks otherwise."""
    result = run_bench(tmp_path, "--only=upstream,plain", "--duration=1", "--latency-duration=1")
    assert_served(result, ["upstream", "plain"])
    plain = result["summaries"]["plain"]
    assert plain["added_p50_us"] is not None
    assert plain["single_p50_us"] > 0


@pytest.mark.timeout(60)
def test_harness_runs_on_its_fallbacks(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "--only=baseline",
        "--loadgen=python",
        "--upstream=python",
        "--duration=0.5",
        "--latency-duration=0",
    )
    assert_served(result, ["baseline"])
    assert result["meta"]["comparable"] is False
    assert result["meta"]["upstream"] == "python"


@pytest.mark.timeout(90)
def test_paired_mode_runs_both_sides_at_once(tmp_path: Path) -> None:
    result, done = bench_process(
        tmp_path, "--paired", "--pairs=split-again", "--duration=1", "--loadgen=python",
        "--upstream=python", "--connections=4", timeout=80,
    )  # fmt: skip
    (summary,) = result["summaries"]
    assert summary["measured"] == "split-again" and summary["reference"] == "split"
    assert summary["rounds"] == 1 and summary["errors"] == 0
    # Both sides were served at once: each got part of the one proxy CPU.
    assert 0.0 < summary["cpu_share_median"] < 1.0
    assert summary["rps_ratio_median"] > 0
    # The absolute extra CPU per request agrees in sign with the relative one (one round:
    # both come from the same two CPU-per-request figures), and is printed.
    extra, relative = summary["cpu_extra_us_per_request"], summary["cpu_per_request_cost"]
    assert math.isfinite(extra) and (extra > 0) == (relative > 0)
    assert "extra CPU us/request" in done.stdout


@pytest.mark.timeout(90)
@needs_redis
def test_paired_canary_side_runs_a_started_canary_against_traces(tmp_path: Path) -> None:
    result, _ = bench_process(
        tmp_path, "--paired", "--pairs=canary", "--duration=2", "--loadgen=python",
        "--upstream=python", "--connections=4", f"--redis-url={REDIS_URL}", timeout=80,
    )  # fmt: skip
    (summary,) = result["summaries"]
    assert summary["measured"] == "canary" and summary["reference"] == "traces"
    assert summary["rounds"] == 1 and summary["errors"] == 0
    # Judged on its extra CPU per request, not on a share of req/s.
    assert summary["limit"] is None and summary["limit_us"] == 3.0
    assert summary["passed"] in (True, False)
    (check,) = result["acceptance"]
    assert "adds <= 3 us CPU/request" in check["check"] and check["measured"].endswith(")")
    # The canary was started and counted the side's requests into its step, in the store.
    (note,) = [n for n in result["meta"]["notes"] if n.startswith("canary (last round)")]
    assert "canary active (" in note and " at weight 0.5;" in note, note
    # Its status and counts went with the run (every gateway had prefixes of its own).
    pattern = f"gwbench{result['meta']['run_id']}g*"
    with redis.Redis.from_url(REDIS_URL) as client:
        assert list(client.scan_iter(match=pattern, count=1000)) == []


@pytest.mark.timeout(60)
@needs_redis
def test_table_mode_starts_the_canary_cell(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "--only=canary", "--duration=1", "--latency-duration=0", "--loadgen=python",
        "--upstream=python", f"--redis-url={REDIS_URL}",
    )  # fmt: skip
    assert_served(result, ["canary"])
    notes = result["summaries"]["canary"]["notes"]
    assert any(n.startswith("canary active (") and " at weight 0.5;" in n for n in notes), notes


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_store_calls_of_a_running_canary_are_per_second_not_per_request(tmp_path: Path) -> None:
    out = tmp_path / "calls.json"
    command = [
        sys.executable, "-m", "bench.store_calls", "--only=canary", "--requests=1000",
        "--idle=1.5", "--warmup=100", f"--json={out}",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=80, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (cell,) = json.loads(out.read_text())["cells"]
    assert "canary active (" in cell["canary"], cell
    # The canary talks to the store every second, idle or not (its status at least)...
    assert cell["idle_commands"].get("HMGET", 0) >= 1, cell
    # ... and not per request: 1,000 requests in a second or so make a few dozen at most.
    assert cell["per_request"] < 0.2, cell
    assert "| commands/request |" in done.stdout


def test_pairs_are_checked_by_name() -> None:
    from bench.run import parse_args

    assert parse_args(["--paired", "--pairs", "canary, traces"]).pairs == ["canary", "traces"]
    with pytest.raises(SystemExit):
        parse_args(["--paired", "--pairs", "canary,nope"])


@pytest.mark.timeout(90)
def test_scale_mode_measures_the_chosen_cells_in_alternating_order(tmp_path: Path) -> None:
    result, done = bench_process(
        tmp_path, "--scale", "--cells=1x1, 2x2,2x2:1", "--feature=split", "--rounds=2",
        "--duration=1", "--loadgen=python", "--upstream=python", "--connections=4",
        timeout=80,
    )  # fmt: skip
    assert sorted(result["summaries"]) == ["1x1", "2x2", "2x2:1"]
    for name, summary in result["summaries"].items():
        assert summary["rps"] > 0 and summary["errors"] == 0, name
    # Round 1 runs the cells in the given order, round 2 backwards.
    order = [line.split()[2] for line in done.stderr.splitlines() if line.startswith("[round")]
    assert order == ["1x1", "2x2", "2x2:1", "2x2:1", "2x2", "1x1"], done.stderr


def test_scale_cells_are_parsed_and_bad_ones_named() -> None:
    from bench.gateway_configs import request_paths
    from bench.run import scale_cell

    assert scale_cell("100x8") == (100, 8, 100)
    assert scale_cell(" 1x1 ") == (1, 1, 1)
    assert scale_cell("100x8:1") == (100, 8, 1)
    assert scale_cell("100x8:100").name == "100x8"
    # Spread: one path per route, each routed to its own route; one route: its path only.
    assert scale_cell("10x1").paths == request_paths(10)
    assert len(set(request_paths(10))) == 10
    assert scale_cell("10x1:3").paths == request_paths(10)[:3]
    assert scale_cell("10x1:3").label == "10 routes x 1 endpoints, traffic on 3 routes"
    # Item 4 judges the cells whose traffic is on one route (see ScaleCell.spread).
    assert [scale_cell(n).spread for n in ("1x1", "100x8:1", "100x8", "10x1:3")] == [
        False, False, True, True,
    ]  # fmt: skip
    for bad in ("100", "x8", "ax8", "0x1", "1x0", "1x9", "2x1:0", "2x1:3", "2x1:", "2x1:a"):
        with pytest.raises(SystemExit, match="--cells"):
            scale_cell(bad)


@pytest.mark.timeout(90)
def test_scale_acceptance_is_judged_only_against_one_route_one_endpoint(tmp_path: Path) -> None:
    result, _ = bench_process(
        tmp_path, "--scale", "--cells=100x8,1x1", "--feature=split", "--duration=1",
        "--loadgen=python", "--upstream=python", "--connections=4", timeout=80,
    )  # fmt: skip
    assert sorted(result["summaries"]) == ["100x8", "1x1"]
    # 100 x 8 is the reference here, so its ratio to itself says nothing about item 4.
    assert result["summaries"]["100x8"]["x_baseline"] == 1.0
    assert result["acceptance"] == []


@pytest.mark.timeout(90)
@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_scale_mode_runs_nginx_laid_out_like_the_gateway(tmp_path: Path) -> None:
    result, done = bench_process(
        tmp_path, "--scale", "--scale-proxy=nginx", "--cells=1x1,3x2", "--duration=1",
        "--loadgen=python", "--upstream=python", "--connections=4", timeout=80,
    )  # fmt: skip
    assert result["proxy"] == "nginx" and result["feature"] is None
    assert_served(result, ["1x1", "3x2"])
    assert result["summaries"]["1x1"]["cpu_x_baseline"] == 1.0
    assert result["summaries"]["3x2"]["cpu_x_baseline"] > 0
    assert result["acceptance"] == []  # item 4 is about the gateway, not judged here
    assert "nginx: 3 routes x 2 endpoints" in done.stdout


def test_nginx_scale_config_has_a_location_and_two_groups_per_route(tmp_path: Path) -> None:
    from bench.nginx import scale_proxy_config

    config = scale_proxy_config(tmp_path, 8080, "127.0.0.1", [9001, 9002], ["/a", "/a1"])
    assert config.count("location ") == 2
    assert "location /a1 {" in config
    for group in ("route0_v1", "route0_v2", "route1_v1", "route1_v2"):
        start = config.index(f"upstream {group} {{")
        block = config[start : config.index("}", start)]
        assert "server 127.0.0.1:9001;" in block and "server 127.0.0.1:9002;" in block
    assert "proxy_pass http://route1_$variant;" in config
    assert 'split_clients "${request_id}" $variant' in config


def test_item_4_is_judged_on_one_route_and_the_spread_cell_reported() -> None:
    from bench.run import scale_acceptance

    summaries = {
        "1x1": {"x_baseline": 1.0},
        "100x8": {"x_baseline": 0.91},
        "100x8:1": {"x_baseline": 0.96},
    }
    lines = {line["check"]: line for line in scale_acceptance("1x1", summaries)}
    (one,) = [line for check, line in lines.items() if "one route" in check]
    (spread,) = [line for check, line in lines.items() if "spread" in check]
    assert one["passed"] is True and one["measured"] == "0.960x"
    assert spread["passed"] is None and "not judged" in spread["check"]
    summaries["100x8:1"]["x_baseline"] = 0.94
    (one,) = [x for x in scale_acceptance("1x1", summaries) if "one route" in x["check"]]
    assert one["passed"] is False
    assert scale_acceptance("100x8", summaries) == []  # 1 x 1 is not the reference


def test_paired_spread_pair_is_reported_not_judged() -> None:
    from bench.paired import PAIRS, PairRuns, paired_table

    runs = {pair.measured: PairRuns(*pair) for pair in PAIRS}
    for pair in runs.values():
        pair.rps_ratios, pair.cpu_ratios = [0.9], [0.9]
        pair.cpu_shares, pair.cpu_extra_us = [0.5], [10.0]
    spread, one = runs["traces-100x8"].summary(), runs["traces-100x8-one"].summary()
    assert spread["passed"] is None and spread["limit"] == 0.05
    assert one["passed"] is False  # a 10 % cost against 5 %
    table = paired_table([spread, one])
    assert "reported, not judged (<= 5%)" in table and "FAIL (<= 5%)" in table


def test_paired_canary_is_judged_on_extra_us_per_request_whatever_its_share() -> None:
    from bench.paired import PAIRS, PairRuns, paired_table

    (pair,) = [p for p in PAIRS if p.measured == "canary"]
    runs = PairRuns(*pair)
    # A 10 % share of req/s, but 2.5 us a request in the median of three rounds: passes.
    runs.rps_ratios, runs.cpu_ratios, runs.cpu_shares = [0.9] * 3, [0.9] * 3, [0.5] * 3
    runs.cpu_extra_us = [4.0, 2.5, -1.0]
    summary = runs.summary()
    assert summary["passed"] is True and summary["cpu_extra_us_per_request"] == 2.5
    assert (summary["cpu_extra_us_min"], summary["cpu_extra_us_max"]) == (-1.0, 4.0)
    assert "| +2.5 (-1.0 - +4.0) |" in paired_table([summary])
    runs.cpu_extra_us = [4.0, 3.5, 1.0]
    assert runs.summary()["passed"] is False
