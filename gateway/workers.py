"""``gateway run --workers N``: N worker processes sharing the listeners.

Each worker is a full gateway bound with SO_REUSEPORT, so the kernel spreads connections
over them. What must agree across workers goes through shared places: Prometheus values
through the client library's multiprocess files (any worker answers a scrape with the
sum), weights through the state store (a change made through one worker's admin API
reaches the others through the store's watcher), traces through Redis, where windows
from several writers add up.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("gateway.workers")

# A worker that dies this soon after it started is not restarted: it would only die again
# (a port taken, a bad environment) and hide the reason in a restart loop.
MIN_UPTIME_FOR_RESTART = 5.0


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def supervise(config_path: str, workers: int, extra_args: Sequence[str] = ()) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as metrics_dir:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        # The supervisor's own prometheus_client must see the directory too, for
        # mark_process_dead.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        command = [sys.executable, "-m", "gateway.cli", *extra_args, "run", "-c", config_path]
        command += ["--worker", str(os.getpid())]
        stopping = False

        def start() -> tuple[subprocess.Popen[bytes], float]:
            return subprocess.Popen(command, env=env), time.monotonic()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            for process, _ in procs:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

        procs = [start() for _ in range(workers)]
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("started %d workers: %s", workers, ", ".join(str(p.pid) for p, _ in procs))
        exit_code = 0
        try:
            while procs:
                time.sleep(0.2)
                running = []
                for process, started in procs:
                    code = process.poll()
                    if code is None:
                        running.append((process, started))
                        continue
                    _mark_dead(process.pid)
                    if stopping:
                        exit_code = exit_code or code
                    elif time.monotonic() - started < MIN_UPTIME_FOR_RESTART:
                        log.error("worker %d exited with %d at start: stopping", process.pid, code)
                        exit_code = code or 1
                        on_signal(signal.SIGTERM, None)
                    else:
                        log.warning("worker %d exited with %d: restarting it", process.pid, code)
                        running.append(start())
                procs = running
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process, _ in procs:
                if process.poll() is None:
                    process.kill()
        return exit_code
