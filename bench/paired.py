"""Side-by-side runs: two gateways loaded at the same time on the same CPU.

``python -m bench.run --paired`` answers "what does this feature cost in requests/s?"
on a machine whose CPU speed drifts by more than that cost within minutes. Interleaved
rounds (A B A B ...) only cancel drift slower than a round; here A and B run *at once*,
both pinned to the proxy CPU, each loaded by its own wrk with the same connection count.
Both are always runnable, so the kernel's fair scheduler gives each half of the CPU, and
whatever the CPU's speed does happens to both alike: their requests/s ratio is the
ratio of what a request costs each, which is the feature's cost.

Two gateway processes with the same config differ by 1-3 % in requests/s (memory
layout, hash seeds), a bias a single pair of processes would carry into every round. So
every round starts both sides afresh, and the median is over process pairs as well as
over time.

Checks that come with it:

- which side's load starts first alternates between rounds, so no order effect can hide
  in the ratio;
- an A/A pair (the same configuration twice) measures the method's own error;
- the CPU each side used is reported: a fair share is about 50/50, and CPU time per
  request gives the same ratio without assuming a fair share.

A pair is judged on its cost in requests/s (a fraction) or on its extra CPU time per
request (microseconds): the latter for work that must stay small in absolute terms
whatever the rest costs, as a running canary's counting must (at most 3 us a request).
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bench.context import Bench, Target, canary_activity
from bench.gateway_configs import Feature, ScaleCell
from bench.loadgen import LoadResult, LoadSpec
from bench.procs import cpu_seconds, free_port

_ONE = ScaleCell(1, 1, 1)
# name: (feature, routes x endpoints) of every gateway the paired runs need.
_CELLS = {
    "split": (Feature.SPLIT, _ONE),
    "split-again": (Feature.SPLIT, _ONE),
    "traces": (Feature.TRACES, _ONE),
    "shadow": (Feature.SHADOW, _ONE),
    "canary": (Feature.CANARY, _ONE),
    "traces-100x8": (Feature.TRACES, ScaleCell(100, 8, 100)),
    "traces-100x8-one": (Feature.TRACES, ScaleCell(100, 8, 1)),
}


class Pair(NamedTuple):
    """A question: what the ``measured`` side costs over the ``reference`` side, judged
    against ``limit`` (cost in req/s, a fraction) and ``limit_us`` (extra CPU us per
    request) when given; reported only with neither."""

    question: str
    measured: str
    reference: str
    limit: float | None = None
    limit_us: float | None = None


PAIRS = (
    Pair("A/A control: split against split", "split-again", "split"),
    Pair("traces cost (split + traces against split)", "traces", "split", 0.03),
    Pair("shadow 10% cost (shadow against split + traces)", "shadow", "traces", 0.15),
    Pair(
        "100 routes x 8 endpoints, traffic on all routes, against 1 x 1 (traces)",
        "traces-100x8",
        "traces",
        0.05,
    ),
    Pair(
        "100 routes x 8 endpoints, traffic on one route, against 1 x 1 (traces)",
        "traces-100x8-one",
        "traces",
        0.05,
    ),
    # The canary's counting is designed to cost nothing per request (the Record step's
    # counters serve it; a timer reads them once a second): an absolute limit, since
    # the same few us would be a larger share of a faster gateway.
    Pair(
        "running canary's cost (canary holding at 50% against split + traces)",
        "canary",
        "traces",
        limit_us=3.0,
    ),
)


@dataclass
class PairRuns:
    question: str
    measured: str
    reference: str
    limit: float | None = None
    limit_us: float | None = None
    rps_ratios: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)  # reference / measured CPU us/req
    cpu_shares: list[float] = field(default_factory=list)  # measured side's share of CPU
    # Measured minus reference CPU per request, in us: what the feature costs in absolute
    # terms, which does not grow when the reference side gets faster (a ratio does).
    cpu_extra_us: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        ratio = statistics.median(self.rps_ratios)
        cost = 1.0 - ratio
        extra_us = statistics.median(self.cpu_extra_us)
        out: dict[str, Any] = {
            "question": self.question,
            "measured": self.measured,
            "reference": self.reference,
            "rounds": len(self.rps_ratios),
            "rps_ratio_median": ratio,
            "rps_ratio_min": min(self.rps_ratios),
            "rps_ratio_max": max(self.rps_ratios),
            "cost": cost,
            "cpu_per_request_cost": 1.0 - statistics.median(self.cpu_ratios),
            "cpu_extra_us_per_request": extra_us,
            # The spread of the rounds: one median of a few noisy rounds says little alone.
            "cpu_extra_us_min": min(self.cpu_extra_us),
            "cpu_extra_us_max": max(self.cpu_extra_us),
            "cpu_extra_us_rounds": list(self.cpu_extra_us),
            "cpu_share_median": statistics.median(self.cpu_shares),
            "errors": self.errors,
            "limit": self.limit,
            "limit_us": self.limit_us,
        }
        if self.limit is not None or self.limit_us is not None:
            # Spread traffic is reported against its limit, not judged (ScaleCell.spread).
            out["passed"] = (
                None
                if _CELLS[self.measured][1].spread
                else (self.limit is None or cost <= self.limit)
                and (self.limit_us is None or extra_us <= self.limit_us)
            )
        return out


def run_paired(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    chosen = set(args.pairs)
    wanted = [p for p in PAIRS if not chosen or p.measured in chosen]

    def needs_redis(pair: Pair) -> bool:
        return any(_CELLS[name][0].needs_redis for name in (pair.measured, pair.reference))

    if any(needs_redis(p) for p in wanted) and not bench.redis_ok:
        bench.notes.append(f"Redis unreachable at {args.redis_url}: only the A/A pair runs")
        wanted = [p for p in wanted if not needs_redis(p)]
    upstream = bench.start_upstream([free_port() for _ in range(8)])
    started: list[Target] = []

    def start(name: str, code: Path | None) -> Target:
        feature, cell = _CELLS[name]
        target = bench.start_gateway(
            feature, upstream.urls[: cell.endpoints], routes=cell.routes, name=name, code=code
        )
        started.append(target)
        return target

    def spec(target: Target, name: str, seconds: float) -> LoadSpec:
        # Every side rotates over its paths through the same dynamic script, so wrk's own
        # per-request cost is the same on both sides of every pair.
        return LoadSpec(
            target.base_url, _CELLS[name][1].paths, args.connections, seconds, dynamic=True
        )

    runs = [PairRuns(*pair) for pair in wanted]
    with ThreadPoolExecutor(max_workers=2) as pool:

        def both(targets: dict[str, Target], seconds: float) -> dict[str, LoadResult]:
            futures = {
                name: pool.submit(bench.loadgen.run, spec(target, name, seconds))
                for name, target in targets.items()
            }
            return {name: future.result() for name, future in futures.items()}

        for round_no in range(1, args.rounds + 1):
            for pair in runs:
                # Alternate which side's process and load start first.
                order = [pair.measured, pair.reference]
                if round_no % 2 == 0:
                    order.reverse()
                code = {pair.measured: args.measured_code, pair.reference: args.reference_code}
                targets = {name: start(name, code[name]) for name in order}
                bench.wait_all_ready(list(targets.values()))
                for name, target in targets.items():
                    for path in _CELLS[name][1].paths:
                        bench.sanity_check(target, path)
                if args.warmup > 0:
                    both(targets, args.warmup)
                bench.wait_quiet()
                cpu_before = {n: cpu_seconds(t.child.pid) for n, t in targets.items()}
                loads = both(targets, args.duration)
                results = {
                    n: (loads[n], cpu_seconds(t.child.pid) - cpu_before[n])
                    for n, t in targets.items()
                }
                _record(pair, results)
                bench.log(_progress_line(round_no, args.rounds, pair, results))
                for name, target in targets.items():
                    if _CELLS[name][0].canary:
                        # Every round's: a canary that stopped (rolled back, say) would
                        # leave its side measuring something else.
                        assert target.admin_url is not None
                        activity = canary_activity(target.admin_url, target.routes)
                        bench.log(f"  {name}: {activity}")
                        if round_no == args.rounds:
                            bench.notes.append(f"{name} (last round): {activity}")
                for target in targets.values():
                    bench.children.stop(target.child)
    bench.children.stop_all()
    bench.note_trace_keys(started)
    summaries = [pair.summary() for pair in runs]
    return {
        "mode": "paired",
        "summaries": summaries,
        "acceptance": [
            {
                "check": f"{s['question']}: {_limits(s)}"
                + (" (reported, not judged)" if s["passed"] is None else ""),
                "measured": _measured(s),
                "passed": s["passed"],
            }
            for s in summaries
            if "passed" in s
        ],
        "table": paired_table(summaries),
    }


def _limits(summary: dict[str, Any]) -> str:
    limits = []
    if summary["limit"] is not None:
        limits.append(f"costs <= {summary['limit']:.0%} req/s")
    if summary["limit_us"] is not None:
        limits.append(f"adds <= {summary['limit_us']:g} us CPU/request")
    return " and ".join(limits)


def _measured(summary: dict[str, Any]) -> str:
    figures = []
    if summary["limit"] is not None:
        figures.append(f"{summary['cost']:.1%}")
    if summary["limit_us"] is not None:
        figures.append(
            f"{summary['cpu_extra_us_per_request']:+.1f} us (rounds "
            f"{summary['cpu_extra_us_min']:+.1f} to {summary['cpu_extra_us_max']:+.1f})"
        )
    return ", ".join(figures)


def _record(pair: PairRuns, results: dict[str, tuple[LoadResult, float]]) -> None:
    (measured, cpu_m), (reference, cpu_r) = results[pair.measured], results[pair.reference]
    pair.rps_ratios.append(measured.rps / reference.rps if reference.rps else float("nan"))
    per_m = cpu_m / measured.requests if measured.requests else float("nan")
    per_r = cpu_r / reference.requests if reference.requests else float("nan")
    pair.cpu_ratios.append(per_r / per_m if per_m else float("nan"))
    pair.cpu_extra_us.append((per_m - per_r) * 1e6)
    pair.cpu_shares.append(cpu_m / (cpu_m + cpu_r) if cpu_m + cpu_r else float("nan"))
    pair.errors += sum(r.errors + r.non_2xx for r, _ in results.values())


def _progress_line(
    round_no: int, rounds: int, pair: PairRuns, results: dict[str, tuple[LoadResult, float]]
) -> str:
    measured, reference = results[pair.measured][0], results[pair.reference][0]
    return (
        f"[paired {round_no}/{rounds}] {pair.measured} {measured.rps:,.0f} req/s vs "
        f"{pair.reference} {reference.rps:,.0f} req/s: ratio {pair.rps_ratios[-1]:.3f}, "
        f"CPU share {pair.cpu_shares[-1]:.0%}"
    )


def paired_table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| question | rounds | req/s ratio (median) | min - max | cost in req/s "
        "| cost in CPU us/request | extra CPU us/request (min - max) "
        "| CPU share of measured side "
        "| result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        bounds = []
        if s["limit"] is not None:
            bounds.append(f"<= {s['limit']:.0%}")
        if s["limit_us"] is not None:
            bounds.append(f"<= {s['limit_us']:g} us")
        limits = ", ".join(bounds)
        if not limits:
            result = "-"
        elif s["passed"] is None:
            result = f"reported, not judged ({limits})"
        else:
            result = f"{'PASS' if s['passed'] else 'FAIL'} ({limits})"
        lines.append(
            f"| {s['question']} | {s['rounds']} | {s['rps_ratio_median']:.3f} "
            f"| {s['rps_ratio_min']:.3f} - {s['rps_ratio_max']:.3f} | {s['cost']:+.1%} "
            f"| {s['cpu_per_request_cost']:+.1%} | {s['cpu_extra_us_per_request']:+.1f} "
            f"({s['cpu_extra_us_min']:+.1f} - {s['cpu_extra_us_max']:+.1f}) "
            f"| {s['cpu_share_median']:.1%} | {result} |"
        )
    return "\n".join(lines)
