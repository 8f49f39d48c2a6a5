"""AIBrix's ``load_reader`` module, from the copy in ``tests/aibrix/vendor/``.

The copy is AIBrix 0.8.0's file, unchanged (``vendor/README.md`` says where it comes from,
its licence and why it is a copy rather than a dependency). It is checked against its
recorded SHA-256, then compiled into a private module object: it is never imported as
part of the test packages, and nothing is fetched while the tests run.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

AIBRIX_VERSION = "0.8.0"
# The module as the published wheel (aibrix-0.8.0-py3-none-any.whl) ships it.
MODULE_PATH = "aibrix/gpu_optimizer/load_monitor/load_reader.py"
MODULE_SHA256 = "7e41a3d4e9f8d9abf4d08ae5feb46a565de08b487e04723085b6c80cae870940"
COPY = Path(__file__).resolve().parent / "vendor" / "load_reader.py"


def reader_source(path: Path = COPY) -> bytes:
    """The module's source, once it is known to be AIBrix's own."""
    source = path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    if digest != MODULE_SHA256:
        raise RuntimeError(
            f"{path}: sha256 {digest}, expected {MODULE_SHA256} (AIBrix {AIBRIX_VERSION}'s "
            f"{MODULE_PATH}): the copy was changed"
        )
    return source


def load_reader_module(path: Path = COPY) -> types.ModuleType:
    module = types.ModuleType("aibrix_load_reader_isolated")
    module.__file__ = str(path)
    exec(compile(reader_source(path), module.__file__, "exec"), module.__dict__)
    return module
