"""Bounded costs on a real server: what hostile or oversized input may cost the backend.

Junk on the event log's subjects is one incident with a count (never a log line per
entry); the access stream has retention limits and cut-down fields; the event stream
has a maximum message size; the largest secret is one stated number, refused in one
line by the CLI and the backend alike, and it follows the server's `max_payload`;
deeply nested JSON anywhere is the protocol's error for that field; a bucket deleted
under a running backend is recreated, and a write is never reported failed yet stored;
a forged `STREAM.INFO` answer from a stranger delays a get by at most the freshness
timeout and never makes it serve stale data.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import pytest

from actors.backend import REJECTED_ENTRIES
from support.harness import Identity, fresh_names, running_backend

if TYPE_CHECKING:
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio


async def test_junk_on_the_log_is_one_incident_with_a_count(
    module_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """500 untagged messages on the log's subjects: counted, logged once, gets go on."""
    names = fresh_names()
    identity = Identity()
    caplog.set_level(logging.INFO)
    async with running_backend(module_nats_server.url, names=names) as clients:
        assert await clients.admin.put_secret("s", "v") == 1
        await clients.admin.add_mapping(identity.entity_key, ["s"])
        nc = clients.host.nc
        for i in range(500):
            await nc.publish(f"wasmcloud_secrets_events.{names.name}.junk", b"junk %d" % i)
        await nc.flush()
        view = clients.backend.view
        assert view is not None
        with anyio.fail_after(30):
            while view.rejected < 500:  # the follower has folded every junk entry
                await view.wait_applied(view.applied_seq + 1)
        incident = clients.backend.health.incidents[REJECTED_ENTRIES]
        assert incident.count == 500
        assert (await clients.get(identity, "s")).string_secret == "v"
        assert await clients.admin.put_secret("s", "v2") == 2  # revisions unaffected by junk
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"incident {REJECTED_ENTRIES}: latest at #3: "), errors
