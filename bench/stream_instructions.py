"""Instructions the gateway executes per streamed chunk and per stream, under callgrind.

    python -m bench.stream_instructions                    # this checkout
    python -m bench.stream_instructions --reference /tmp/ref   # and another, paired

CPU time per chunk (``bench.stream``) moves by more than a few per cent from run to run
on a shared VM; the instructions of the same code path do not. The gateway (split 50 %
and Redis traces, as in ``bench.stream``) runs under ``valgrind --tool=callgrind
--instr-atstart=no`` in front of ``bench.stream_upstream``; after a warm-up that is not
counted, ``--streams`` streams of ``--few`` chunks and then as many of ``--many`` chunks
are counted, twice each. Per chunk: the difference of the smaller counts over the extra
chunks; per stream: the smaller ``--few`` count over the streams (its set-up, its
``--few`` chunks, its end). What it does not see, as ``bench.instructions`` does not:
time in the kernel and cache misses. And under callgrind a loop pass carries about one
chunk, where at 2,000 streams it carries about ten: per-pass work weighs more here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gateway_configs
from bench.context import _http_ok, _redis_ping
from bench.gateway_configs import REQUEST_PATH, Feature, Listen
from bench.instructions import callgrind_totals
from bench.procs import Children, bench_env, free_port, tcp_open

_STARTUP_SECONDS = 180.0


def measure(args: argparse.Namespace, children: Children, code: Path | None) -> dict[str, Any]:
    """Counts for the gateway of ``code`` (a checkout; None: this one)."""
    work = children.workdir
    upstream_port, port, admin_port = free_port(), free_port(), free_port()
    upstream = children.start(
        f"upstream{port}",
        [sys.executable, "-m", "bench.stream_upstream", "--port", str(upstream_port)],
        env=bench_env(),
    )
    children.wait_ready(upstream, lambda: tcp_open("127.0.0.1", upstream_port))
    prefix = f"gwstreamcg{port}"
    listen = Listen(port, admin_port, work / f"state{port}.db", args.redis_url, prefix)
    document = gateway_configs.feature_document(
        Feature.TRACES, listen, [f"http://127.0.0.1:{upstream_port}"]
    )
    for backend in document["backends"].values():
        backend["max_connections"] = 100_000
    config = gateway_configs.write(document, work / f"gateway{port}.yaml")
    env = bench_env()
    if code is not None:
        env["PYTHONPATH"] = f"{code}:{env['PYTHONPATH']}"
    out = work / f"callgrind{port}.out"
    gateway = children.start(
        f"gateway{port}",
        [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            # -P: not the current directory first on sys.path, so PYTHONPATH decides.
            sys.executable, "-P", "-m", "gateway.cli", "run", "-c", str(config),
        ],
        env=env,
    )  # fmt: skip
    children.wait_ready(
        gateway,
        lambda: _http_ok(f"http://127.0.0.1:{admin_port}/readyz"),
        timeout=_STARTUP_SECONDS,
    )
    url = f"http://127.0.0.1:{port}{REQUEST_PATH}"

    def streams(count: int, chunks: int) -> None:
        argv = [sys.executable, "-m", "bench.stream_client", "--url", url]
        argv += ["--streams", str(count), "--chunks", str(chunks), "--interval-ms", "100"]
        done = subprocess.run(argv, capture_output=True, env=bench_env(), check=True)
        result = json.loads(done.stdout)
        if result["complete"] != count:
            raise RuntimeError(f"{count - result['complete']} streams incomplete: {result}")

    def control(option: str) -> None:
        subprocess.run(["callgrind_control", option, str(gateway.pid)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip

    def counted(chunks: int) -> int:
        control("--instr=on")
        streams(args.streams, chunks)
        time.sleep(0.5)  # the streams' ends, written after the client saw [DONE]
        control("--instr=off")
        control("--dump")
        dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))
        return callgrind_totals(dumps[-1])

    streams(20, 5)  # warm-up, not counted
    few = min(counted(args.few), counted(args.few))
    many = min(counted(args.many), counted(args.many))
    children.stop(gateway)
    children.stop(upstream)
    extra_chunks = args.streams * (args.many - args.few)
    return {
        "code": str(code) if code is not None else "this checkout",
        "per_chunk": round((many - few) / extra_chunks),
        "per_stream": round(few / args.streams),
        "few_chunks": args.few,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--few", type=int, default=10, help="chunks per stream, first count")
    parser.add_argument("--many", type=int, default=60, help="chunks per stream, second count")
    parser.add_argument("--reference", type=Path, help="a checkout of other code, paired")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench.stream_instructions: {tool} is not installed (apt: valgrind)",
                  file=sys.stderr)  # fmt: skip
            return 2
    if not _redis_ping(args.redis_url):
        print(f"bench.stream_instructions: no Redis at {args.redis_url}", file=sys.stderr)
        return 2
    codes: list[Path | None] = [None] if args.reference is None else [None, args.reference]
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-streamcg-") as work,
        Children(Path(work)) as children,
    ):
        results = [measure(args, children, code) for code in codes]
    for result in results:
        print(
            f"{result['code']}: {result['per_chunk']:,} instructions per chunk, "
            f"{result['per_stream']:,} per stream (with its {result['few_chunks']} chunks)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
