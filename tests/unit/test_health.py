"""Incidents are logged once per kind and counted after, never a line per occurrence."""

from __future__ import annotations

import logging

import pytest

from actors.health import Health


def test_an_incident_is_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    health = Health()
    with caplog.at_level(logging.ERROR, logger="actors.health"):
        assert health.report("junk", "untagged entry at 7")
        for seq in range(8, 1000):
            assert not health.report("junk", f"untagged entry at {seq}")
    assert len(caplog.records) == 1
    [junk] = health.snapshot()
    assert junk["count"] == 993
    assert junk["detail"] == "untagged entry at 999"
    assert not health.writes_blocked


def test_a_blocking_incident_blocks_writes_until_resolved() -> None:
    health = Health()
    health.report("junk", "x")
    health.report("chain-broken", "at 12", blocks_writes=True)
    assert health.writes_blocked
    assert [i["kind"] for i in health.snapshot()] == ["junk", "chain-broken"]
    health.resolve("chain-broken")
    assert not health.writes_blocked
    health.resolve("chain-broken")  # resolving twice is harmless
    assert [i["kind"] for i in health.snapshot()] == ["junk"]
