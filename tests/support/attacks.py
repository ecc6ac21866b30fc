"""What anyone on the bus can do to a backend's streams with no key: for the integrity tests.

An attacker holds a plain connection (no seed, no credentials) and may delete, copy and
republish what JetStream stores; the tests then show that no state chosen so is served.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import MSG_ID_HEADER


@contextlib.asynccontextmanager
async def attacker(url: str) -> AsyncIterator[NATS]:
    """A plain connection: no seed, no credentials, only the bus."""
    nc = await connect(NatsOptions(servers=(url,)), name="attacker", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


async def cut_back(nc: NATS, stream: str, subject: str, keep: int) -> None:
    """Replace `stream` by its first `keep` entries, published again on `subject` with
    their headers (tags and all) but for the message id: a log rolled back, each entry
    genuine."""
    js = nc.jetstream()
    kept = [await js.get_msg(stream, seq) for seq in range(1, keep + 1)]
    config = (await js.stream_info(stream)).config
    await js.delete_stream(stream)
    await js.add_stream(config)
    for message in kept:
        headers = {k: v for k, v in (message.headers or {}).items() if k != MSG_ID_HEADER}
        await js.publish(subject, message.data or b"", headers=headers)
