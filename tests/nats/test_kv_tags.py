"""The KV views' newest entries are read back at start-up: only entries a backend wrote pass.

A backend that appended an event and died before its KV write leaves the bucket one
revision behind the log. Someone with nothing but a NATS connection can fill that
revision with exactly what the log implies (a mapping's names are plain JSON in the
event; a put's sealed bytes are in the event too), so a content comparison passes and
the restarted KV writer would take the revision as already written. The KV tag tells:
`run` refuses such an entry in one line, names the bucket and revision, and writes
nothing; after `rebuild` it starts and serves the log's own entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from events.log import EventLog
from events.types import Event, MappingAdded, SecretPut
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.streams import kv_stream
from support.cliproc import ok, one_line_error
from support.harness import Identity, Keys, cli_env, run_cli, running_backend
from support.leakcheck import remembered
from support.store import log_entries

pytestmark = pytest.mark.anyio

SECRETS = "WASMCLOUD_SECRETS"
STATE = "SECRETS_nats-kv_state"


@contextlib.asynccontextmanager
async def plain_connection(url: str) -> AsyncIterator[NATS]:
    """No seed, no credentials: what anyone on the bus has."""
    nc = await connect(NatsOptions(servers=(url,)), name="no keys", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


async def append_without_kv_write(url: str, keys: Keys, event: Event) -> None:
    """What a backend that died right after its append leaves: the event, no KV entry."""
    async with plain_connection(url) as nc:
        entries = await log_entries(nc, keys)
        log = EventLog(nc, backend_name="nats-kv", barrier=Barrier(keys.encryption))
        await log.append(event, expected_last_seq=entries[-1].seq, previous=entries[-1].link)


async def forge(url: str, bucket: str, key: str, value: bytes) -> int:
    """Publish `value` under `key` in `bucket` from a connection with no keys; its revision."""
    async with plain_connection(url) as nc:
        ack = await nc.jetstream().publish(f"$KV.{bucket}.{key}", value)
        assert KV_TAG_HEADER  # the forger has no key to make this header's value
        return ack.seq


async def bucket_head(url: str, bucket: str) -> int:
    async with plain_connection(url) as nc:
        return (await stream_state(nc, kv_stream(bucket), 5.0)).last_seq


def provenance() -> dict[str, object]:
    return {"at": 1.0, "admin_key": "", "authenticated": True, "request_id": ""}


@pytest.mark.parametrize("bucket", [STATE, SECRETS])
async def test_run_refuses_an_entry_it_did_not_write_at_the_head_of_a_bucket(
    nats_server: NatsServer, bucket: str
) -> None:
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        await clients.admin.put_secret("db", remembered("tagged-db-value", "secret value"))
        await clients.admin.add_mapping(reader.entity_key, ["db"])
    before = await bucket_head(url, bucket)
    if bucket == STATE:
        event: Event = MappingAdded(entity=reader.entity_key, secrets=("db", "api"), **provenance())
        key, value = reader.entity_key, msgspec.json.encode(["api", "db"])
    else:
        sealed = Barrier(keys.encryption).seal(remembered(b"copied-api-value", "secret value"))
        event = SecretPut(name="api", sealed=sealed, kind="binary", **provenance())
        key, value = "api", sealed
    await append_without_kv_write(url, keys, event)
    # The revision the log implies next, filled by someone without the key, with exactly
    # the content the log implies there.
    assert await forge(url, bucket, key, value) == before + 1

    env = cli_env(keys)
    issuer = ("--trusted-issuer", reader.account.public_key)  # no warning about its absence
    refused = run_cli("run", "--nats-address", url, *issuer, env=env, timeout=60)
    one_line_error(refused, kv_stream(bucket), f"revision {before + 1}", "did not write", "rebuild")
    assert await bucket_head(url, bucket) == before + 1  # refused before writing anything

    # The operator's way out: rebuild the views from the log; then the entry is ours.
    ok(run_cli("rebuild", "--nats-address", url, env=env, timeout=60))
    async with running_backend(url, keys) as clients:
        if bucket == STATE:
            assert sorted((await clients.admin.mappings())[reader.entity_key]) == ["api", "db"]
        else:
            await clients.admin.add_mapping(reader.entity_key, ["api"])
            assert (await clients.get(reader, "api")).binary_secret == list(b"copied-api-value")
