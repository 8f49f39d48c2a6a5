"""Fallback load generator (aiohttp client) for machines without wrk.

Good enough to check that the harness works end to end (the smoke test); not a
benchmark tool: a Python client needs more CPU per request than the proxy it measures.
Prints one ``BENCHJSON`` line in the same shape as the wrk script's ``done()`` hook.

``python -m bench.pyload '<LoadSpec as JSON>'``
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Sequence

import aiohttp

from bench.loadgen import REQUEST_BODY, RESULT_MARK, LoadSpec


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


async def drive(spec: LoadSpec) -> dict[str, object]:
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    counter = itertools.count(1)
    started = time.perf_counter()
    deadline = started + spec.duration
    urls = [spec.base_url.rstrip("/") + path for path in spec.paths]
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    connector = aiohttp.TCPConnector(limit=spec.connections)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                n = next(counter)
                headers = {"Content-Type": "application/json"}
                if spec.unique_ids:
                    headers["X-Request-ID"] = f"{spec.id_prefix}-1-{n}"
                sent = time.perf_counter()
                try:
                    async with session.post(
                        urls[n % len(urls)], data=REQUEST_BODY, headers=headers
                    ) as response:
                        await response.read()
                        latencies.append(time.perf_counter() - sent)
                        if not 200 <= response.status < 400:
                            errors["status"] += 1
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue

        await asyncio.gather(*(worker() for _ in range(spec.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    us = [x * 1e6 for x in latencies]
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "errors": errors,
        "latency_us": {
            "p50": _percentile(us, 0.5),
            "p90": _percentile(us, 0.9),
            "p99": _percentile(us, 0.99),
            "max": us[-1] if us else 0.0,
            "mean": sum(us) / len(us) if us else 0.0,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    raw = json.loads(args[0])
    raw["paths"] = tuple(raw["paths"])
    spec = LoadSpec(**raw)
    from bench.loop import run

    result = run(drive(spec))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
