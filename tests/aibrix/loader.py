"""Load AIBrix's ``load_reader`` module on its own, without installing AIBrix.

The ``aibrix`` package pins old versions of libraries the gateway uses, so it cannot live
in our environment, and none of its source is copied into this repository. Instead the
published wheel (a pinned version, checked against a pinned SHA-256) is fetched from
PyPI with pip into a cache directory the first time, and the one module is compiled
straight out of the zip into a private module object. Its only imports are numpy, pandas
and redis, which our test extra already provides.

Set ``AIBRIX_WHEEL=/path/to/aibrix-0.8.0-py3-none-any.whl`` to use a wheel fetched in
advance (it is still hash-checked).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

AIBRIX_VERSION = "0.8.0"
WHEEL_NAME = f"aibrix-{AIBRIX_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "3d2c9e2f5c53ab846c3ca025424a7b767d57723e12aa1885ed3b6616f472353e"
MODULE_PATH = "aibrix/gpu_optimizer/load_monitor/load_reader.py"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_wheel(cache_dir: Path) -> Path:
    override = os.environ.get("AIBRIX_WHEEL")
    wheel = Path(override) if override else cache_dir / WHEEL_NAME
    if not wheel.exists() and not override:
        cache_dir.mkdir(parents=True, exist_ok=True)
        requirement = cache_dir / "requirements.txt"
        requirement.write_text(f"aibrix=={AIBRIX_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--require-hashes", "--disable-pip-version-check", "-q",
             "-r", str(requirement), "-d", str(cache_dir)],
            capture_output=True, text=True, timeout=90, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not fetch {WHEEL_NAME} from PyPI (set AIBRIX_WHEEL to a local copy):"
                f"\n{proc.stderr}"
            )
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def load_reader_module(cache_dir: Path) -> types.ModuleType:
    wheel = fetch_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(MODULE_PATH)
    module = types.ModuleType("aibrix_load_reader_isolated")
    module.__file__ = f"{wheel}!/{MODULE_PATH}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
