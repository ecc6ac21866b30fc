"""The JetStream event log passes the event log's conformance suite (a real nats-server),
the same suite the in-memory log used by the unit tier passes (tests/unit/test_memlog.py)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import pytest

from events.log import EventLog
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import XKey
from support.log_conformance import CHECKS

if TYPE_CHECKING:
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio
_names = itertools.count()


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_jetstream_log_conforms(nats_server: NatsServer, check: str) -> None:
    nc = await connect(
        NatsOptions(servers=(nats_server.url,)), name="conformance", persistent=False
    )
    try:
        log = EventLog(
            nc,
            backend_name=f"conform{next(_names)}",
            barrier=Barrier(XKey.generate()),
        )
        await log.ensure()
        await CHECKS[check](log)
    finally:
        await nc.close()
