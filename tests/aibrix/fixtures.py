"""Fixtures for the tests that read traces with AIBrix's own reader. Test modules import
the ones they use (``from tests.aibrix.fixtures import ...``), as with the Redis ones."""

from __future__ import annotations

import types
import uuid
from collections.abc import Iterator

import pytest

from tests.aibrix.loader import load_reader_module
from tests.redis_fixtures import SHARED_REDIS_URL, delete_prefix, require_redis


@pytest.fixture(scope="module")
def load_reader() -> types.ModuleType:
    """AIBrix's ``load_reader`` module (the copy in ``tests/aibrix/vendor/``)."""
    return load_reader_module()


@pytest.fixture
def aibrix_model() -> Iterator[str]:
    """The reader hard-codes the ``aibrix:`` key prefix on the shared Redis: a model name
    nobody else uses, whose trace keys are deleted after the test."""
    require_redis()
    name = f"gwtest-{uuid.uuid4().hex[:12]}"
    yield name
    delete_prefix(SHARED_REDIS_URL, f"aibrix:{name}_request_trace_*")


def forget_writer(writer_id: str) -> None:
    """Delete the write markers a trace writer left under the ``aibrix:`` prefix."""
    delete_prefix(SHARED_REDIS_URL, f"aibrix:gateway_trace_write:{writer_id}:*")
