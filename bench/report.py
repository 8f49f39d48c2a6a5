"""Summaries of interleaved rounds, and the tables printed from them.

Ratios are taken per round and then the median over rounds (pairs measured minutes
apart in the same round share the same machine drift; medians of ratios cancel it,
ratios of medians do not).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import LoadResult

# Share of a CPU taken by processes outside the benchmark that marks a row as disturbed.
DISTURBED = 0.05


@dataclass
class Measured:
    """Every run of one target, in round order."""

    name: str
    label: str
    loaded: list[LoadResult] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    single: list[LoadResult] = field(default_factory=list)
    # CPUs' worth of time used by processes the harness did not start, per loaded run.
    foreign_cpu: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired(
    a: Sequence[LoadResult], b: Sequence[LoadResult], f: Callable[[LoadResult, LoadResult], float]
) -> float | None:
    """Median over rounds of f(a[r], b[r])."""
    return median([f(x, y) for x, y in zip(a, b, strict=False)])


def _rps_ratio(x: LoadResult, y: LoadResult) -> float:
    return x.rps / y.rps if y.rps else float("nan")


def summarize(
    target: Measured,
    baseline: Measured | None,
    nginx: Measured | None,
    direct: Measured | None,
) -> dict[str, Any]:
    loaded = target.loaded
    cpu_per_request = cpu_per_request_of(target)
    cpu_share = [cpu / run.seconds for cpu, run in zip(target.cpu_seconds, loaded, strict=False)]
    summary: dict[str, Any] = {
        "label": target.label,
        "rps": median([r.rps for r in loaded]),
        "p50_ms": _ms(median([r.p50_us for r in loaded])),
        "p99_ms": _ms(median([r.p99_us for r in loaded])),
        "x_baseline": paired(loaded, baseline.loaded, _rps_ratio) if baseline else None,
        "x_nginx": paired(loaded, nginx.loaded, _rps_ratio) if nginx else None,
        "single_p50_us": median([r.p50_us for r in target.single]),
        "single_p99_us": median([r.p99_us for r in target.single]),
        "added_p50_us": None,
        "added_p99_us": None,
        "cpu_us_per_request": median(cpu_per_request),
        "cpu_x_baseline": _cpu_ratio(cpu_per_request, baseline) if baseline else None,
        "cpu_share": median(cpu_share),
        "foreign_cpu_max": max(target.foreign_cpu, default=None),
        "errors": sum(r.errors for r in loaded + target.single),
        "non_2xx": sum(r.non_2xx for r in loaded + target.single),
        "notes": target.notes,
    }
    if direct is not None and direct is not target and direct.single:
        summary["added_p50_us"] = paired(
            target.single, direct.single, lambda x, y: x.p50_us - y.p50_us
        )
        summary["added_p99_us"] = paired(
            target.single, direct.single, lambda x, y: x.p99_us - y.p99_us
        )
    return summary


def cpu_per_request_of(target: Measured) -> list[float]:
    """CPU microseconds per request of each loaded run."""
    return [
        cpu / run.requests * 1e6
        for cpu, run in zip(target.cpu_seconds, target.loaded, strict=False)
        if run.requests
    ]


def _cpu_ratio(cpu_per_request: list[float], baseline: Measured) -> float | None:
    """Median over rounds of CPU per request over the baseline's: the cost of a proxy that
    the load side, not its own CPU, holds back (nginx), where req/s cannot show it."""
    theirs = cpu_per_request_of(baseline)
    return median([a / b for a, b in zip(cpu_per_request, theirs, strict=False) if b])


def disturbance_note(measured: Sequence[Measured]) -> str | None:
    worst = max((x for m in measured for x in m.foreign_cpu), default=0.0)
    if worst < DISTURBED:
        return None
    return (
        f"WARNING: processes outside the benchmark used up to {worst:.0%} of a CPU during "
        "measured runs; those figures are disturbed (run on a quiet machine)"
    )


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main_table(summaries: dict[str, dict[str, Any]]) -> str:
    header = (
        "| target | req/s | x baseline | x nginx | p50 ms | p99 ms "
        "| 1-conn p50 us | added p50 us | added p99 us | CPU us/req | notes |"
    )
    rows = [header, "|" + "---|" * 11]
    for s in summaries.values():
        rows.append(
            f"| {s['label']} | {_fmt(s['rps'], ',.0f')} | {_fmt(s['x_baseline'], '.2f')} "
            f"| {_fmt(s['x_nginx'], '.2f')} | {_fmt(s['p50_ms'], '.2f')} "
            f"| {_fmt(s['p99_ms'], '.2f')} | {_fmt(s['single_p50_us'], '.0f')} "
            f"| {_fmt(s['added_p50_us'], '.0f')} | {_fmt(s['added_p99_us'], '.0f')} "
            f"| {_fmt(s['cpu_us_per_request'], '.1f')} | {_notes(s)} |"
        )
    return "\n".join(rows)


def _notes(s: dict[str, Any]) -> str:
    notes = list(s["notes"])
    foreign = s.get("foreign_cpu_max")
    if foreign is not None and foreign >= DISTURBED:
        notes.insert(0, f"DISTURBED: other processes used up to {foreign:.0%} of a CPU")
    if s["errors"] or s["non_2xx"]:
        notes.insert(0, f"ERRORS: {s['errors']} socket, {s['non_2xx']} non-2xx")
    return "; ".join(notes)


def scale_table(summaries: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| routes x endpoints | req/s | x (1 x 1) | p50 ms | p99 ms | CPU us/req "
        "| CPU/req x (1 x 1) | notes |"
    ]
    rows.append("|" + "---|" * 8)
    for s in summaries.values():
        rows.append(
            f"| {s['label']} | {_fmt(s['rps'], ',.0f')} | {_fmt(s['x_baseline'], '.3f')} "
            f"| {_fmt(s['p50_ms'], '.2f')} | {_fmt(s['p99_ms'], '.2f')} "
            f"| {_fmt(s['cpu_us_per_request'], '.1f')} | {_fmt(s['cpu_x_baseline'], '.3f')} "
            f"| {_notes(s)} |"
        )
    return "\n".join(rows)
