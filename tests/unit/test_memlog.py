"""The in-memory event log passes the event log's conformance suite (no server)."""

from __future__ import annotations

import pytest

from support.log_conformance import CHECKS
from support.memlog import MemoryEventLog

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_memory_log_conforms(check: str) -> None:
    await CHECKS[check](MemoryEventLog())
