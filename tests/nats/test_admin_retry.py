"""The admin client retries a write the backend could not finish, with the same bytes.

A backend answers `UpstreamError` when JetStream did not answer it in time (a leader
election, views slow to catch up): the write may or may not be stored. `AdminClient`
(and so the CLI) sends the very same sealed request again, which the bound request id
makes safe (tests/nats/test_cluster_integrity.py shows a real backend answering such a
retry with the first put's revision across a failover). Here a responder on a real
server answers as a backend would in that moment, and records what it was sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient, upstream_failed
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import UpstreamError
from secrets_nats_kv.nats.connection import connect
from support.harness import Keys
from support.leakcheck import remembered

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
UPSTREAM = wire.encode_put_response(0, UpstreamError("the event log did not answer in time"))


def answers(*replies: bytes) -> Iterator[bytes]:
    yield from replies
    while True:
        yield replies[-1]


@pytest.mark.parametrize(
    ("replies", "outcome"),
    [
        ((UPSTREAM, wire.encode_put_response(7)), 7),
        ((UPSTREAM, UPSTREAM, wire.encode_put_response(7)), 7),
        ((UPSTREAM,), UpstreamError),  # still failing after every retry: said so
        ((wire.encode_put_response(3),), 3),  # no retry when it worked
    ],
)
async def test_a_put_answered_upstream_error_is_sent_again_unchanged(
    nats_server: NatsServer, replies: tuple[bytes, ...], outcome: int | type[Exception]
) -> None:
    keys = Keys()
    nc = await connect(NatsOptions(servers=(nats_server.url,)), name="test", persistent=False)
    try:
        sent: list[bytes] = []
        script = answers(*replies)

        async def backend(msg: Msg) -> None:
            sent.append(msg.data)
            await msg.respond(next(script))

        await nc.subscribe(NAMES.subject("put_secret"), cb=backend)
        admin = AdminClient(nc, NAMES, keys.transit, transit=keys.transit.public_key)
        value = remembered("retried-value", "secret value")
        if isinstance(outcome, int):
            assert await admin.put_secret("retried", value) == outcome
            assert len(sent) == len(replies)
        else:
            with pytest.raises(outcome):
                await admin.put_secret("retried", value)
            assert len(sent) == admin.retries + 1
        assert len(set(sent)) == 1  # the same sealed bytes: one request id, applied once
        plaintext = keys.transit.open(sent[0], admin.admin_key.public_key)
        opened = wire.decode_put_request(plaintext, authenticated=True)
        assert isinstance(opened, wire.AdminPutSecretRequest)
        assert opened.request_id
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("reply", "upstream"),
    [
        (UPSTREAM, True),
        (b'{"error":{"UpstreamError":"writes are refused"}}', True),
        (b'{"error":{"Unauthorized":"UpstreamError"}}', False),
        (wire.encode_put_response(0, UpstreamError("x")).replace(b"Upstream", b"Other"), False),
        (b"ok", False),
        (b"UpstreamError", False),
        (wire.encode_put_response(5), False),
    ],
)
def test_only_an_upstream_error_reply_is_retried(reply: bytes, upstream: bool) -> None:
    assert upstream_failed(reply) is upstream
