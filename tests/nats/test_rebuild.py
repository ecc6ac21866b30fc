"""`rebuild` against a real server: the KV views folded again from the log, byte for byte.

A scripted history exercises every kind of entry the fold turns into KV writes (puts of
string and binary values, deletes, undeletes, destroys of a version, of an undeleted copy
and of everything, mappings added and removed), so the log the rebuild reads has gaps
where destroy erased puts. Both buckets are snapshotted completely (every message still
present: key, revision, value, headers) before and after, and must be identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import pytest
from nats.aio.client import Client as NATS

from events.log import EventLog
from projections.kv import KvBuckets, KvLayout, KvWriter
from projections.rebuild import RebuildReport, rebuild_views, refold_views
from projections.state import ViewState, fold
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.errors import SecretNotFound
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from support.harness import Clients, Identity, Keys, cli_env, run_cli, running_backend
from support.store import SECRETS_KV, STATE_KV, messages_in

pytestmark = pytest.mark.anyio

LAYOUT = KvLayout(secrets_bucket="WASMCLOUD_SECRETS", state_bucket="SECRETS_nats-kv_state")

Message = tuple[int, str, bytes, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Snapshot:
    """Both buckets, completely: stream bounds and every message still present."""

    secrets_bounds: tuple[int, int, int]
    state_bounds: tuple[int, int, int]
    secrets: tuple[Message, ...]
    state: tuple[Message, ...]


async def snapshot(nc: NATS) -> Snapshot:
    async def bucket(stream: str) -> tuple[tuple[int, int, int], tuple[Message, ...]]:
        bounds = await stream_state(nc, stream, 5.0)
        messages = tuple(
            (m.seq or 0, m.subject or "", m.data or b"", tuple(sorted((m.headers or {}).items())))
            for m in await messages_in(nc, stream)
        )
        return (bounds.messages, bounds.first_seq, bounds.last_seq), messages

    secrets_bounds, secrets = await bucket(SECRETS_KV)
    state_bounds, state = await bucket(STATE_KV)
    return Snapshot(secrets_bounds, state_bounds, secrets, state)


@dataclass
class History:
    """What the scripted history leaves readable, and who may read it."""

    reader: Identity
    readable: dict[tuple[str, str], str | bytes]  # (name, version) -> value
    unreadable: list[tuple[str, str | None]]  # (name, version or latest)
    latest: dict[str, str]  # name -> latest version


BINARY = b"\x00\xffbinary-beta\x01"
# What the secrets bucket holds after the history: the rest was erased by destroy.
SURVIVING = [
    (1, "alpha"),
    (3, "beta"),
    (5, "alpha"),  # delete marker
    (7, "alpha"),
    (8, "beta"),  # delete marker
    (10, "delta"),  # delete marker
    (13, "eps"),
]


async def scripted_history(clients: Clients) -> History:
    admin = clients.admin
    reader, other = Identity(), Identity.provider()
    assert await admin.put_secret("alpha", "alpha-1") == 1
    assert await admin.put_secret("alpha", "alpha-2") == 2
    assert await admin.put_secret("beta", BINARY) == 3
    assert await admin.put_secret("gamma", "gamma-1") == 4
    await admin.add_mapping(reader.entity_key, ["alpha", "beta", "gamma", "delta", "zeta"])
    await admin.add_mapping(other.entity_key, ["beta"])
    await admin.remove_mapping(reader.entity_key, ["zeta"])
    await admin.add_mapping(reader.entity_key, ["eps"])
    assert await admin.delete("alpha") == 5
    assert await admin.undelete("alpha") == 6  # a copy of revision 2
    assert await admin.put_secret("alpha", "alpha-3") == 7
    assert await admin.destroy("alpha", version=6) == [2, 6]  # the copy and its original
    assert await admin.delete("beta") == 8
    assert await admin.destroy("gamma", all=True) == [4]
    assert await admin.put_secret("delta", "delta-1") == 9
    assert await admin.delete("delta") == 10
    assert await admin.undelete("delta") == 11
    assert await admin.destroy("delta", version=9) == [9, 11]  # deleted again
    assert await admin.put_secret("eps", "eps-1") == 12
    assert await admin.put_secret("eps", "eps-2") == 13
    assert await admin.destroy("eps", version=12) == [12]
    await admin.add_mapping(other.entity_key, ["eps"])
    await admin.remove_mapping(other.entity_key, ["beta"])
    return History(
        reader=reader,
        readable={
            ("alpha", "1"): "alpha-1",
            ("alpha", "7"): "alpha-3",
            ("eps", "13"): "eps-2",
        },
        unreadable=[
            ("alpha", "2"),
            ("alpha", "6"),
            ("beta", None),
            ("beta", "3"),
            ("gamma", None),
            ("gamma", "4"),
            ("delta", None),
            ("delta", "9"),
            ("delta", "11"),
            ("eps", "12"),
        ],
        latest={"alpha": "7", "eps": "13"},
    )


async def assert_serves(clients: Clients, history: History) -> None:
    for (name, version), value in history.readable.items():
        secret = await clients.get(history.reader, name, version=version)
        assert (secret.version, secret.string_secret) == (version, value)
    for name, version in history.latest.items():
        secret = await clients.get(history.reader, name)
        assert secret.version == version
    for name, maybe_version in history.unreadable:
        with pytest.raises(SecretNotFound):
            await clients.get(history.reader, name, version=maybe_version)


async def rebuild(url: str, keys: Keys) -> RebuildReport:
    nc = await connect(NatsOptions(servers=(url,)), name="rebuild", persistent=False)
    try:
        return await rebuild_views(
            nc,
            backend_name="nats-kv",
            layout=LAYOUT,
            barrier=Barrier(keys.encryption),
        )
    finally:
        await nc.close()


async def corrupt_views(nc: NATS) -> None:
    """Views gone wrong (someone wrote to the buckets directly): rebuild must undo this."""
    js = nc.jetstream(timeout=5)
    await js.publish("$KV.WASMCLOUD_SECRETS.alpha", b"not a sealed value")
    await js.publish("$KV.SECRETS_nats-kv_state.MAAAA", b'["alpha"]')


async def test_rebuild_views_reproduces_both_buckets_exactly(nats_server: NatsServer) -> None:
    keys = Keys()
    async with running_backend(nats_server.url, keys) as clients:
        await scripted_history(clients)
        before = await snapshot(clients.admin.nc)
        listing = await clients.admin.list_secrets()
    assert before.secrets_bounds[2] == 13  # every revision the history wrote
    assert [(m[0], m[1].rsplit(".", 1)[1]) for m in before.secrets] == SURVIVING

    report = await rebuild(nats_server.url, keys)

    nc = await connect(NatsOptions(servers=(nats_server.url,)), name="t", persistent=False)
    try:
        assert await snapshot(nc) == before
        await corrupt_views(nc)
        assert await snapshot(nc) != before
        await rebuild(nats_server.url, keys)
        assert await snapshot(nc) == before
    finally:
        await nc.close()
    assert report.secrets_revision == 13
    assert report.secrets == 4  # alpha, beta (deleted), delta (deleted) and eps
    assert {item.name for item in listing} == {"alpha", "beta", "delta", "eps"}


async def test_a_refold_that_finds_revisions_taken_keeps_them_and_writes_the_rest(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend's writer got there first: the pipeline stops, the rest goes one by one."""
    keys = Keys()
    async with running_backend(nats_server.url, keys) as clients:
        await scripted_history(clients)
        before = await snapshot(clients.admin.nc)
    nc = await connect(NatsOptions(servers=(nats_server.url,)), name="t", persistent=False)
    try:
        auth = Barrier(keys.encryption)
        event_log = EventLog(nc, backend_name="nats-kv", barrier=auth)
        views = KvBuckets(nc, LAYOUT)
        await views.drop()
        await views.ensure()
        # The competing writer: the first entries of the log, as a backend writes them.
        competitor = KvWriter(views, barrier=auth)
        state = ViewState()
        async for entry in event_log.entries():
            for effect in fold(state, entry.seq, entry.event):
                await competitor.apply(effect)
            if state.state_revision >= 1:  # both buckets have a revision taken now
                break
        competitor.close()
        taken = await snapshot(nc)
        assert (taken.secrets_bounds[2], taken.state_bounds[2]) == (4, 1)

        with caplog.at_level(logging.WARNING, logger="projections.rebuild"):
            refolded = await refold_views(nc, event_log, views)

        assert await snapshot(nc) == before
        assert refolded.secrets_revision == 13
        assert any("going on one by one" in r.getMessage() for r in caplog.records)
    finally:
        await nc.close()


async def test_the_rebuild_command_reproduces_both_buckets_exactly(
    nats_server: NatsServer,
) -> None:
    keys = Keys()
    async with running_backend(nats_server.url, keys) as clients:
        await scripted_history(clients)
        await corrupt_views(clients.admin.nc)
        corrupted = await snapshot(clients.admin.nc)
    nc = await connect(NatsOptions(servers=(nats_server.url,)), name="t", persistent=False)
    try:
        env = cli_env(keys)
        done = await anyio.to_thread.run_sync(
            lambda: run_cli("rebuild", "--nats-address", nats_server.url, env=env)
        )
        assert done.returncode == 0, done.stderr
        assert b"secrets bucket at revision 13" in done.stdout
        after = await snapshot(nc)
    finally:
        await nc.close()
    assert after != corrupted
    # The same as the first rebuild makes of the same log, and with no corruption in it.
    again = await rebuild(nats_server.url, keys)
    nc = await connect(NatsOptions(servers=(nats_server.url,)), name="t", persistent=False)
    try:
        assert await snapshot(nc) == after
    finally:
        await nc.close()
    assert again.secrets_revision == 13
    assert [(m[0], m[1].rsplit(".", 1)[1]) for m in after.secrets] == SURVIVING


async def test_rebuild_under_a_running_backend_then_writes_and_a_restart(
    nats_server: NatsServer,
) -> None:
    keys = Keys()
    async with running_backend(nats_server.url, keys) as clients:
        history = await scripted_history(clients)
        before = await snapshot(clients.admin.nc)
        listing = await clients.admin.list_secrets()
        mappings = await clients.admin.mappings()

        await rebuild(nats_server.url, keys)

        assert await snapshot(clients.admin.nc) == before
        await assert_serves(clients, history)
        # Writes go on at the next revision of each bucket.
        assert await clients.admin.put_secret("alpha", "alpha-4") == 14
        await clients.admin.add_mapping(history.reader.entity_key, ["zeta", "omega"])
        state = await stream_state(clients.admin.nc, STATE_KV, 5.0)
        assert state.last_seq == before.state_bounds[2] + 1
        history.readable[("alpha", "14")] = "alpha-4"
        history.latest["alpha"] = "14"
        await assert_serves(clients, history)
        listing = await clients.admin.list_secrets()
        mappings = await clients.admin.mappings()
        final = await snapshot(clients.admin.nc)

    async with running_backend(nats_server.url, keys) as restarted:
        await assert_serves(restarted, history)
        assert await restarted.admin.list_secrets() == listing
        assert await restarted.admin.mappings() == mappings
        assert await snapshot(restarted.admin.nc) == final  # nothing rewritten on start
        assert await restarted.admin.put_secret("eps", "eps-3") == 15
