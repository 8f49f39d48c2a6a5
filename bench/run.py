"""Benchmark the gateway against a minimal aiohttp proxy and nginx (see bench/README.md).

python -m bench.run [--duration 10] [--connections 64] [--rounds 3] [--json out.json]
                    [--only upstream,nginx,baseline,plain,split,traces,shadow,canary]
python -m bench.run --memory      # RSS before/after 200,000 distinct request IDs
python -m bench.run --scale       # req/s with 1/10/100 routes x 1/8 endpoints
python -m bench.run --paired      # feature costs from gateways loaded side by side
python -m bench.run --paired --pairs canary --rounds 8    # one pair: canary against traces
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import nginx
from bench.context import Bench, Target
from bench.gateway_configs import REQUEST_PATH, Feature, ScaleCell
from bench.loadgen import LoadSpec
from bench.paired import PAIRS, run_paired
from bench.procs import ChildFailed, free_port, rss_bytes
from bench.report import (
    Measured,
    cpu_per_request_of,
    disturbance_note,
    main_table,
    paired,
    scale_table,
    summarize,
)

TARGETS = ("upstream", "nginx", "baseline", *(f.value for f in Feature))
MEMORY_LIMIT_BYTES = 10 * 1024 * 1024
# Direct upstream req/s over the fastest Python proxy's below which the upstream (or the
# load side's CPU) may be what is being measured.
UPSTREAM_HEADROOM = 3.0
SCALE_ROUTES = (1, 10, 100)
SCALE_ENDPOINTS = (1, 8)
SCALE_REFERENCE = "1x1"
# Item 4's cells: judged with traffic on one route, reported with it spread over all
# (ScaleCell.spread says why).
SCALE_CHECKS = {
    "100x8:1": "100 routes x 8 endpoints, traffic on one route,",
    "100x8": "100 routes x 8 endpoints, traffic spread over all routes,",
}
SCALE_CELLS = (
    *(f"{r}x{e}" for r in SCALE_ROUTES for e in SCALE_ENDPOINTS),
    "100x8:1",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=None,
        help="seconds per single-connection run (default: --duration; 0 skips them)",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds per target, unmeasured (0 skips)"
    )
    parser.add_argument("--json", type=Path, default=None, help="results file")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help=f"comma-separated subset of: {', '.join(TARGETS)} (repeatable)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--memory", action="store_true", help="RSS growth over distinct IDs")
    mode.add_argument("--scale", action="store_true", help="cost of routes and endpoints")
    mode.add_argument(
        "--paired",
        action="store_true",
        help="feature and scale costs with both sides loaded at once (see bench/paired.py)",
    )
    parser.add_argument(
        "--pairs",
        default="",
        help="--paired: comma-separated measured sides to run, each against its reference "
        f"(default all: {', '.join(p.measured for p in PAIRS)})",
    )
    for side in ("measured", "reference"):
        parser.add_argument(
            f"--{side}-code",
            type=Path,
            default=None,
            metavar="DIR",
            help=f"--paired: the {side} side runs the gateway package of the checkout DIR "
            "(compare two versions of the code: --pairs split-again, the A/A pair)",
        )
    parser.add_argument(
        "--cells",
        default=",".join(SCALE_CELLS),
        help="--scale: ROUTESxENDPOINTS[:ACTIVE ROUTES] cells, the first is the reference "
        "(default: "
        f"{','.join(SCALE_CELLS)}); --cells 1x1,100x8,100x8:1 --duration 3 --rounds 16 "
        "resolves the acceptance cells best on a drifting VM",
    )
    parser.add_argument(
        "--scale-proxy",
        choices=("gateway", "nginx"),
        default="gateway",
        help="--scale: the proxy in every cell; nginx (laid out the same way: a location "
        "per route, two upstream groups each, split by request ID) shows what spreading "
        "traffic costs a C proxy on this machine",
    )
    parser.add_argument("--memory-requests", type=int, default=200_000)
    parser.add_argument(
        "--feature",
        choices=[f.value for f in Feature],
        default=None,
        help="gateway feature set for --memory (default shadow) and --scale (default traces)",
    )
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx proxy row")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this long for other processes to leave the CPUs",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="repeat a run disturbed by other processes"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.latency_duration is None:
        args.latency_duration = args.duration
    names: list[str] = []
    for chunk in args.only or [",".join(TARGETS)]:
        names += [n.strip() for n in chunk.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(TARGETS)})")
    args.only = [n for n in TARGETS if n in names]
    args.pairs = [n.strip() for n in args.pairs.split(",") if n.strip()]
    sides = [p.measured for p in PAIRS]
    unknown = sorted(set(args.pairs) - set(sides))
    if unknown:
        parser.error(f"--pairs: unknown {', '.join(unknown)} (choose from {', '.join(sides)})")
    if args.scale_proxy == "nginx" and nginx.nginx_binary() is None:
        parser.error("--scale-proxy nginx: nginx is not installed")
    if args.rounds < 1 or args.connections < 1 or args.duration <= 0:
        parser.error("--rounds, --connections and --duration must be positive")
    return args


# --- the comparison -------------------------------------------------------------------


def run_comparison(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    upstream = bench.start_upstream([free_port()])
    targets: list[Target] = []
    wanted = set(args.only)
    if "upstream" in wanted:
        targets.append(bench.direct_target(upstream))
    if "nginx" in wanted:
        if args.no_nginx:
            bench.notes.append("nginx proxy row skipped (--no-nginx)")
        elif nginx.nginx_binary() is None:
            bench.notes.append("nginx proxy row skipped: nginx is not installed")
        else:
            targets.append(bench.start_nginx_proxy(upstream))
    if "baseline" in wanted:
        targets.append(bench.start_baseline(upstream))
    for feature in Feature:
        if feature.value not in wanted:
            continue
        if feature.needs_redis and not bench.redis_ok:
            bench.notes.append(f"{feature.label} skipped: Redis unreachable at {args.redis_url}")
            continue
        targets.append(bench.start_gateway(feature, [upstream.url]))
    bench.wait_all_ready(targets)
    for target in targets:
        bench.sanity_check(target, REQUEST_PATH)

    paths = (REQUEST_PATH,)
    loaded = LoadSpec("", paths, args.connections, args.duration)
    single = LoadSpec("", paths, 1, args.latency_duration)
    if args.warmup > 0:
        bench.warm_up(targets, LoadSpec("", paths, args.connections, args.warmup))
    for round_no in range(1, args.rounds + 1):
        for target in targets:
            bench.measure_loaded(target, loaded, f"round {round_no}/{args.rounds}")
        if args.latency_duration > 0:
            for target in targets:
                bench.measure_single(target, single, f"round {round_no}/{args.rounds}")
    bench.note_feature_activity(targets)
    bench.children.stop_all()
    bench.note_trace_keys(targets)

    by_name = {t.name: t.measured for t in targets}
    _note_disturbance(bench, targets)
    _note_headroom(bench, summaries_rps(by_name))
    summaries = {
        t.name: summarize(
            t.measured, by_name.get("baseline"), by_name.get("nginx"), by_name.get("upstream")
        )
        for t in targets
    }
    return {
        "mode": "comparison",
        "summaries": summaries,
        "acceptance": comparison_acceptance(by_name, summaries),
        "runs": {t.name: runs_json(t.measured) for t in targets},
        "table": main_table(summaries),
    }


def summaries_rps(by_name: dict[str, Measured]) -> dict[str, float]:
    return {
        name: statistics.median(r.rps for r in m.loaded) for name, m in by_name.items() if m.loaded
    }


def _note_headroom(bench: Bench, rps: dict[str, float]) -> None:
    """The upstream must never be what limits a proxy's figure."""
    direct = rps.get("upstream")
    python_proxies = [v for k, v in rps.items() if k not in ("upstream", "nginx")]
    if direct is None or not python_proxies:
        return
    headroom = direct / max(python_proxies)
    verdict = "ok" if headroom >= UPSTREAM_HEADROOM else "TOO LOW: the upstream may limit"
    bench.notes.append(
        f"upstream headroom: direct {direct:,.0f} req/s = {headroom:.1f}x the fastest "
        f"Python proxy ({verdict})"
    )


def _note_disturbance(bench: Bench, targets: list[Target]) -> None:
    note = disturbance_note([t.measured for t in targets])
    if note is not None:
        bench.notes.append(note)


def comparison_acceptance(
    by_name: dict[str, Measured], summaries: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Issue 5's acceptance figures that this run can answer."""
    checks: list[dict[str, Any]] = []

    def ratio(a: str, b: str) -> float | None:
        if a not in by_name or b not in by_name:
            return None
        return paired(
            by_name[a].loaded, by_name[b].loaded, lambda x, y: x.rps / y.rps if y.rps else 0.0
        )

    traces_x = summaries.get("traces", {}).get("x_baseline")
    if traces_x is not None:
        checks.append(
            _check(
                "1. split + traces req/s >= 1.0x the minimal aiohttp proxy (aim 1.3x)",
                f"{traces_x:.2f}x",
                traces_x >= 1.0,
            )
        )
    baseline_added = summaries.get("baseline", {}).get("added_p50_us")
    for name in ("plain", "split", "traces", "shadow", "canary"):
        added = summaries.get(name, {}).get("added_p50_us")
        if added is not None and baseline_added is not None:
            checks.append(
                _check(
                    f"2. {name}: added p50 at 1 connection <= the minimal proxy's",
                    f"{added:.0f} us vs {baseline_added:.0f} us",
                    added <= baseline_added,
                )
            )
    shadow_vs_traces = ratio("shadow", "traces")
    if shadow_vs_traces is not None:
        cost = 1 - shadow_vs_traces
        checks.append(_check("3. shadow at 10% costs <= 15% req/s", f"{cost:.1%}", cost <= 0.15))
    traces_vs_split = ratio("traces", "split")
    if traces_vs_split is not None:
        cost = 1 - traces_vs_split
        checks.append(_check("3. traces cost <= 3% req/s", f"{cost:.1%}", cost <= 0.03))
    if "canary" in by_name and "traces" in by_name:
        # Rounds taken minutes apart drift by more than 3 us: reported here, judged by
        # --paired (its "canary" pair), where both sides share the CPU's speed.
        extra = statistics.median(
            c - t
            for c, t in zip(
                cpu_per_request_of(by_name["canary"]),
                cpu_per_request_of(by_name["traces"]),
                strict=False,
            )
        )
        checks.append(
            _check(
                "running canary adds <= 3 us CPU/request over traces (interleaved rounds: "
                "judged by --paired --pairs canary)",
                f"{extra:+.1f} us",
                None,
            )
        )
    return checks


def _check(what: str, measured: str, passed: bool | None) -> dict[str, Any]:
    """One acceptance line; ``passed`` None for a figure reported but not judged."""
    return {"check": what, "measured": measured, "passed": passed}


def runs_json(measured: Measured) -> dict[str, Any]:
    return {
        "loaded": [r.to_json() for r in measured.loaded],
        "cpu_seconds": measured.cpu_seconds,
        "single": [r.to_json() for r in measured.single],
    }


# --- memory -----------------------------------------------------------------------------


def run_memory(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    feature = bench.feature_or_fallback(args.feature, Feature.SHADOW)
    upstream = bench.start_upstream([free_port()])
    target = bench.start_gateway(feature, [upstream.url])
    bench.wait_all_ready([target])
    bench.sanity_check(target, REQUEST_PATH)
    pid = target.child.pid
    rss_start = rss_bytes(pid)

    def distinct(count: int, tag: str) -> tuple[int, float]:
        """Send at least ``count`` requests, each with an X-Request-ID never used before."""
        done, seconds, chunk_no = 0, 0.0, 0
        # wrk runs by time, not count: size each chunk from the rate seen so far.
        rate = 5000.0
        while done < count:
            chunk_no += 1
            want = (count - done) / rate * 1.05
            spec = LoadSpec(
                "",
                (REQUEST_PATH,),
                args.connections,
                min(max(1.0, want), 120.0),
                unique_ids=True,
                id_prefix=f"{tag}{chunk_no}-{uuid.uuid4().hex[:8]}",
            )
            result = bench.measure_loaded(target, spec, f"memory {tag} chunk {chunk_no}")
            done += result.requests
            seconds += result.seconds
            rate = max(result.rps, 100.0)
        return done, seconds

    warm, _ = distinct(max(1, args.memory_requests // 10), "warm")
    time.sleep(1.0)
    rss_before = rss_bytes(pid)
    sent, seconds = distinct(args.memory_requests, "mem")
    # Shadow copies and trace windows finish off the response path: let them settle.
    time.sleep(2.0)
    rss_after = rss_bytes(pid)
    bench.note_feature_activity([target])
    bench.children.stop_all()
    bench.note_trace_keys([target])
    _note_disturbance(bench, [target])
    growth = rss_after - rss_before
    result: dict[str, Any] = {
        "mode": "memory",
        "feature": feature.value,
        "label": target.label,
        "rss_start_mb": rss_start / 2**20,
        "warmup_requests": warm,
        "rss_before_mb": rss_before / 2**20,
        "requests": sent,
        "rps": sent / seconds if seconds else None,
        "rss_after_mb": rss_after / 2**20,
        "growth_mb": growth / 2**20,
        "notes": target.measured.notes,
        "errors": sum(r.errors + r.non_2xx for r in target.measured.loaded),
    }
    result["acceptance"] = [
        _check(
            f"4. RSS grows < 10 MB over {sent:,} distinct request IDs",
            f"{growth / 2**20:+.1f} MB",
            growth < MEMORY_LIMIT_BYTES,
        )
    ]
    result["table"] = (
        f"{target.label}: RSS {rss_start / 2**20:.1f} MB at start, "
        f"{rss_before / 2**20:.1f} MB after {warm:,} warm-up requests, "
        f"{rss_after / 2**20:.1f} MB after {sent:,} more "
        f"(growth {growth / 2**20:+.1f} MB, {result['rps'] or 0:,.0f} req/s)"
    )
    if target.measured.notes:
        result["table"] += "\nnotes: " + "; ".join(target.measured.notes)
    return result


# --- scale ------------------------------------------------------------------------------


def scale_cell(name: str) -> ScaleCell:
    """'100x8' -> 100 routes x 8 endpoints, traffic on all of them; '100x8:1' -> the same
    config with all traffic on its first route."""
    size, colon, active = name.strip().partition(":")
    routes, sep, endpoints = size.partition("x")
    if (
        not (sep and routes.isdigit() and endpoints.isdigit())
        or int(routes) < 1
        or (colon and not (active.isdigit() and 1 <= int(active) <= int(routes)))
    ):
        raise SystemExit(
            f"--cells: {name!r} is not ROUTESxENDPOINTS[:ACTIVE ROUTES], e.g. 100x8 or 100x8:1"
        )
    if not 1 <= int(endpoints) <= max(SCALE_ENDPOINTS):
        raise SystemExit(f"--cells: {name!r} needs 1 to {max(SCALE_ENDPOINTS)} endpoints")
    return ScaleCell(int(routes), int(endpoints), int(active) if colon else int(routes))


def run_scale(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    feature = bench.feature_or_fallback(args.feature, Feature.TRACES)
    chosen = [scale_cell(name) for name in args.cells.split(",") if name.strip()]
    ports = [free_port() for _ in range(max(cell.endpoints for cell in chosen))]
    upstream = bench.start_upstream(ports)
    targets: list[Target] = []
    cells: dict[str, ScaleCell] = {}
    for cell in chosen:
        if args.scale_proxy == "nginx":
            targets.append(bench.start_nginx_scale(upstream, cell))
        else:
            targets.append(
                bench.start_gateway(
                    feature,
                    upstream.urls[: cell.endpoints],
                    routes=cell.routes,
                    name=cell.name,
                    label=cell.label,
                )
            )
        cells[cell.name] = cell
    bench.wait_all_ready(targets)
    for target in targets:
        for path in cells[target.name].paths:
            bench.sanity_check(target, path)
    specs = {
        t.name: LoadSpec("", cells[t.name].paths, args.connections, args.duration, dynamic=True)
        for t in targets
    }
    for target in targets if args.warmup > 0 else []:
        warm = specs[target.name]
        bench.measure_loaded(
            target,
            LoadSpec("", warm.paths, warm.connections, args.warmup, dynamic=True),
            "warm-up",
            record=False,
        )
    for round_no in range(1, args.rounds + 1):
        # Every other round backwards (A B, B A, ...): with two cells, each is measured
        # next to the other first as often as second, so drift within a round cancels.
        for target in targets if round_no % 2 else targets[::-1]:
            bench.measure_loaded(target, specs[target.name], f"round {round_no}/{args.rounds}")
    bench.note_feature_activity(targets)
    bench.children.stop_all()
    bench.note_trace_keys(targets)
    _note_disturbance(bench, targets)
    reference = targets[0].measured
    summaries = {t.name: summarize(t.measured, reference, None, None) for t in targets}
    # Item 4 is about the gateway; nginx cells are a reference, not judged.
    acceptance = (
        scale_acceptance(targets[0].name, summaries) if args.scale_proxy == "gateway" else []
    )
    return {
        "mode": "scale",
        "feature": feature.value if args.scale_proxy == "gateway" else None,
        "proxy": args.scale_proxy,
        "summaries": summaries,
        "acceptance": acceptance,
        "runs": {t.name: runs_json(t.measured) for t in targets},
        "table": (
            f"feature set: {feature.label}"
            if args.scale_proxy == "gateway"
            else "proxy: nginx (1 worker), a location per route, split 50/50 by request ID"
        )
        + "\n"
        + scale_table(summaries),
    }


def scale_acceptance(reference: str, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Item 4's lines: 100 x 8 against 1 x 1, so only when 1 x 1 is the reference cell."""
    if reference != SCALE_REFERENCE:
        return []
    lines = []
    for name, what in SCALE_CHECKS.items():
        ratio = summaries.get(name, {}).get("x_baseline")
        if ratio is None:
            continue
        judged = not scale_cell(name).spread
        lines.append(
            _check(
                f"4. {what} within 5% of 1 route x 1 endpoint"
                + ("" if judged else " (working set: reported, not judged)"),
                f"{ratio:.3f}x",
                ratio >= 0.95 if judged else None,
            )
        )
    return lines


# --- entry point ------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take the same path as Ctrl-C: unwind through every finally.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # Also when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    bench = Bench.create(workdir, args)
    failed = True
    try:
        if args.memory:
            result = run_memory(bench, args)
        elif args.scale:
            result = run_scale(bench, args)
        elif args.paired:
            result = run_paired(bench, args)
        else:
            result = run_comparison(bench, args)
        failed = False
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the benchmark started", file=sys.stderr)
        failed = False
        return 130
    except ChildFailed as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        if args.keep or failed:
            print(f"bench: work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result["meta"] = bench.meta()
    print_report(result)
    out = args.json or default_results_path(result["mode"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
    return 0


def default_results_path(mode: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(__file__).resolve().parent / "results" / f"{mode}-{stamp}.json"


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print()
    print(f"# gateway benchmark ({result['mode']}), {meta['date']}")
    print(
        f"# {meta['cpu']} x{meta['cpus']}, Python {meta['python']}, aiohttp {meta['aiohttp']}, "
        f"uvloop {meta['uvloop']}"
    )
    print(f"# load generator: {meta['loadgen']}")
    print(f"# upstream: {meta['upstream']}; pinning: {meta['pinning']}")
    if result["mode"] == "memory":
        print(f"# {meta['connections']} connections, every request with a new X-Request-ID")
    elif result["mode"] == "paired":
        print(
            f"# both sides of a pair loaded at once on the proxy CPU, {meta['connections']} "
            f"connections each, {meta['duration']:g}s per run, {meta['rounds']} rounds"
        )
    else:
        print(
            f"# {meta['connections']} connections, {meta['duration']:g}s per cell, "
            f"{meta['rounds']} interleaved rounds; medians over rounds"
        )
    for note in meta["notes"]:
        print(f"# note: {note}")
    print()
    print(result["table"])
    if result.get("acceptance"):
        print()
        for check in result["acceptance"]:
            mark = "INFO" if check["passed"] is None else "PASS" if check["passed"] else "FAIL"
            print(f"[{mark}] {check['check']}: {check['measured']}")
    if not meta["comparable"]:
        print("\nWARNING: fallback load generator; these figures are not comparable with wrk's.")


if __name__ == "__main__":
    sys.exit(main())
