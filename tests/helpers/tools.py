"""Tools some tests need that are not Python packages of the gateway: a browser, promtool.

Outside CI a missing tool skips the tests that need it, with one line saying how to
install it. Under ``CI=true`` it fails them: CI installs every tool (``.ci/run``), so a
missing one there is a broken CI, not a reason to test less.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str, install: str) -> NoReturn:
    message = f"{what} is not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}: CI must install it (.ci/run)", pytrace=False)
    pytest.skip(message)


def executable(name: str, install: str, *, env: str | None = None) -> str:
    """The path of ``name`` (or of the file the variable ``env`` names), else skip or
    fail as the module says."""
    override = os.environ.get(env) if env else None
    found = override if override and os.access(override, os.X_OK) else shutil.which(name)
    if found is None:
        missing(name, install)
    return found
