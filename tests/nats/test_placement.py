"""A replicated stream asked for while its cluster is still forming is waited for.

A new cluster reports healthy before its meta leader has heard from every peer; for a
moment JetStream then refuses to place a three-replica stream ("no suitable peers for
placement", err_code 10005). `run --replicas 3` started in that moment used to exit on
it. Two nodes of three running is that moment held still: every R3 placement is refused
until the third node joins, so the tests need no timing luck.

Guaranteed: `ensure_stream` keeps asking for a bounded time and succeeds once the cluster
can place the stream, logging the wait once; past its bound the refusal stands, as the
project's one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from nats.js import api

from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import NO_SUITABLE_PEERS, JetStreamError, stream_info
from secrets_nats_kv.nats.provisioning import ensure_stream
from support.cluster import NatsCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WAITING = "JetStream cannot place the stream yet"


@pytest.fixture
def two_of_three(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node cluster with only nodes 0 and 1 running: R3 cannot be placed."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        for server in cluster.servers[:2]:
            server.launch()
        for server in cluster.servers[:2]:
            server.wait_ready(30.0)
        yield cluster
    finally:
        cluster.stop()


def _replicated(name: str) -> api.StreamConfig:
    return api.StreamConfig(
        name=name, subjects=[f"{name.lower()}.>"], num_replicas=3, storage=api.StorageType.FILE
    )


class _Seen(logging.Handler):
    """Sets `event` when the placement wait is logged (what the test synchronises on)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = anyio.Event()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(WAITING):
            self.count += 1
            self.event.set()


@pytest.fixture
def seen() -> Iterator[_Seen]:
    handler = _Seen()
    logger = logging.getLogger("secrets_nats_kv.nats.provisioning")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_stream_refused_placement_is_created_once_the_cluster_formed(
    two_of_three: NatsCluster, seen: _Seen
) -> None:
    nc = await connect(
        NatsOptions(servers=tuple(two_of_three.urls[:2])), name="placement", persistent=False
    )
    try:
        created: list[object] = []

        async def create() -> None:
            created.append(await ensure_stream(nc, _replicated("PLACED"), 5.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(create)
            await seen.event.wait()  # refused at least once, and said so
            assert not created
            await anyio.to_thread.run_sync(two_of_three.servers[2].start, 30.0)
        assert created == [None]  # created here, not found existing
        info = await stream_info(nc, "PLACED", 5.0)
        assert info is not None
        assert info.config.num_replicas == 3
        assert seen.count == 1  # one line for the whole wait, however many refusals
    finally:
        await nc.close()


async def test_a_placement_still_refused_after_the_bound_fails_in_one_line(
    two_of_three: NatsCluster, seen: _Seen
) -> None:
    nc = await connect(
        NatsOptions(servers=tuple(two_of_three.urls[:2])), name="placement", persistent=False
    )
    try:
        with pytest.raises(JetStreamError) as caught:
            await ensure_stream(nc, _replicated("NEVER"), 5.0, placement_wait=0.5)
        assert caught.value.err_code == NO_SUITABLE_PEERS
        assert "create stream NEVER" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert seen.count == 1  # it did wait (and said so) before giving up
        assert await stream_info(nc, "NEVER", 5.0) is None  # nothing half-made
    finally:
        await nc.close()
