"""Lifecycle operations against a real backend and server: list, mappings, delete,
undelete and destroy.

Destroy is a promise about bytes, so it is checked on bytes: the ciphertext of a destroyed
version is captured while it exists (in the event stream, the KV stream and the server's
files on disk), and after destroy it must be in none of them, in any encoding the server
could hold it in. A version that was not destroyed is scanned the same way each time, to
show the scan finds what is there.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from events.types import MappingAdded, SecretDeleted, SecretDestroyed, SecretPut
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.errors import (
    InvalidRequest,
    ProtocolError,
    SecretNotFound,
    Unauthorized,
)
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.xkeys import XKey
from support.harness import Clients, Identity, Keys, cli_env, run_cli, running_backend
from support.store import (
    SECRETS_KV,
    STATE_KV,
    files_holding,
    log_entries,
    messages_holding,
    messages_in,
    sealed_at,
)

EVENTS = "SECRETS_nats-kv_events"
DISK_DEADLINE_S = 5.0

pytestmark = pytest.mark.anyio


async def head(nc: NATS) -> int:
    return (await stream_state(nc, EVENTS, 5.0)).last_seq


async def raises(error: type[ProtocolError], call: Awaitable[Any]) -> ProtocolError:
    with pytest.raises(error) as caught:
        await call
    return caught.value


async def wait_on_disk(directory: Path, data: bytes) -> list[str]:
    """Bounded poll: the server writes blocks on its own schedule, there is no event to await."""
    deadline = time.monotonic() + DISK_DEADLINE_S
    found = files_holding(directory, data)
    while not found and time.monotonic() < deadline:
        await anyio.sleep(0.02)
        found = files_holding(directory, data)
    return found


async def cli(
    clients: Clients, server: NatsServer, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """The CLI in a thread, so the in-process backend it talks to keeps serving meanwhile."""
    env = cli_env(clients.keys)
    return await anyio.to_thread.run_sync(
        lambda: run_cli(*args, "--nats-address", server.url, env=env)
    )


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def backend(nats_server: NatsServer) -> AsyncIterator[Clients]:
    async with running_backend(nats_server.url) as clients:
        yield clients


@pytest.fixture
def reader() -> Identity:
    return Identity()


async def value_of(
    clients: Clients, identity: Identity, key: str, version: str | None = None
) -> tuple[str, str | None]:
    secret = await clients.get(identity, key, version=version)
    return secret.version, secret.string_secret


# --- list and mappings --------------------------------------------------------------------


async def test_list_shows_names_latest_versions_and_times_never_values(
    backend: Clients, nats_server: NatsServer
) -> None:
    admin = backend.admin
    before = time.time()
    await admin.put_secret("alpha", "alpha-value-one")
    await admin.put_secret("alpha", "alpha-value-two")
    await admin.put_secret("beta", "beta-value")
    await admin.delete("beta")
    after = time.time()

    listing = {item.name: item for item in await admin.list_secrets()}
    assert sorted(listing) == ["alpha", "beta"]
    alpha, beta = listing["alpha"], listing["beta"]
    assert (alpha.version, alpha.versions, alpha.deleted) == (2, 2, False)
    assert (beta.version, beta.deleted) == (0, True)
    assert beta.versions == 1  # history kept: undelete can restore it
    assert before <= alpha.updated_at <= after
    assert alpha.updated_at <= beta.updated_at <= after

    done = await cli(backend, nats_server, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("alpha\tversion 2\t2 versions\t")
    assert lines[1].startswith("beta\tversion 0\t1 version\t")
    assert lines[1].endswith("(deleted)")
    for value in (b"alpha-value-one", b"alpha-value-two", b"beta-value"):
        assert value not in done.stdout + done.stderr


async def test_mappings_for_everyone_and_for_one_entity(
    backend: Clients, nats_server: NatsServer
) -> None:
    admin = backend.admin
    one, two, nobody = Identity(), Identity.provider(), Identity()
    await admin.add_mapping(one.entity_key, ["a", "b", "c"])
    await admin.add_mapping(two.entity_key, ["b"])
    await admin.remove_mapping(one.entity_key, ["a", "not-mapped"])

    assert await admin.mappings() == {one.entity_key: ["b", "c"], two.entity_key: ["b"]}
    assert await admin.mappings(one.entity_key) == {one.entity_key: ["b", "c"]}
    assert await admin.mappings(two.entity_key) == {two.entity_key: ["b"]}
    assert await admin.mappings(nobody.entity_key) == {nobody.entity_key: []}
    await raises(InvalidRequest, admin.mappings("not-an-entity-key"))

    everyone = await cli(backend, nats_server, "mappings")
    assert everyone.returncode == 0, everyone.stderr
    assert sorted(everyone.stdout.decode().splitlines()) == sorted(
        [f"{one.entity_key}\tb, c", f"{two.entity_key}\tb"]
    )
    just_one = await cli(backend, nats_server, "mappings", two.entity_key)
    assert just_one.returncode == 0, just_one.stderr
    assert just_one.stdout.decode().splitlines() == [f"{two.entity_key}\tb"]


# --- delete and undelete ------------------------------------------------------------------


async def test_delete_hides_every_version_and_undelete_restores_them(
    backend: Clients, reader: Identity
) -> None:
    admin, nc = backend.admin, backend.admin.nc
    assert await admin.put_secret("db", "password-one") == 1
    assert await admin.put_secret("db", "password-two") == 2
    await admin.add_mapping(reader.entity_key, ["db"])
    assert await value_of(backend, reader, "db") == ("2", "password-two")

    assert await admin.delete("db") == 3
    for version in (None, "1", "2", "3"):
        await raises(SecretNotFound, backend.get(reader, "db", version=version))
    (listed,) = await admin.list_secrets()
    assert (listed.name, listed.deleted) == ("db", True)
    # History kept: both puts are still in the log and in the bucket, and revision 3 is
    # the original's delete marker.
    kinds = [type(entry.event) for entry in await log_entries(nc, backend.keys)]
    assert kinds == [SecretPut, SecretPut, MappingAdded, SecretDeleted]
    bucket = {m.seq or 0: m for m in await messages_in(nc, SECRETS_KV)}
    assert sorted(bucket) == [1, 2, 3]
    assert (bucket[3].headers or {}).get("KV-Operation") == "DEL"

    assert await admin.undelete("db") == 4
    assert await value_of(backend, reader, "db") == ("4", "password-two")
    assert await value_of(backend, reader, "db", "1") == ("1", "password-one")
    assert await value_of(backend, reader, "db", "2") == ("2", "password-two")
    assert await value_of(backend, reader, "db", "4") == ("4", "password-two")
    await raises(SecretNotFound, backend.get(reader, "db", version="3"))  # the marker
    (listed,) = await admin.list_secrets()
    assert (listed.version, listed.versions, listed.deleted) == (4, 3, False)


async def test_refused_deletes_and_undeletes_change_nothing(backend: Clients) -> None:
    admin, nc = backend.admin, backend.admin.nc
    await admin.put_secret("gone", "v")
    await admin.delete("gone")
    await admin.put_secret("here", "v")
    await admin.put_secret("shredded", "v")
    await admin.destroy("shredded", version=4)
    start = await head(nc)

    await raises(SecretNotFound, admin.delete("never-existed"))
    await raises(SecretNotFound, admin.delete("gone"))  # already deleted
    await raises(SecretNotFound, admin.undelete("never-existed"))
    await raises(InvalidRequest, admin.undelete("here"))  # not deleted
    # Every version destroyed: gone, the same before and after a restart refolds the log.
    await raises(SecretNotFound, admin.delete("shredded"))
    await raises(SecretNotFound, admin.undelete("shredded"))
    await raises(InvalidRequest, admin.delete("bad name!"))
    await raises(InvalidRequest, admin.undelete("_secrets-nats-kv_erased"))

    assert await head(nc) == start
    listing = {item.name: item.deleted for item in await admin.list_secrets()}
    assert listing == {"gone": True, "here": False}


# --- destroy ------------------------------------------------------------------------------


async def test_destroying_a_version_erases_its_ciphertext_from_streams_and_disk(
    backend: Clients, reader: Identity, nats_server: NatsServer
) -> None:
    admin, nc = backend.admin, backend.admin.nc
    server_dir = nats_server.config.store_dir.parent
    for value in ("api-key-one", "api-key-two", "api-key-three"):
        await admin.put_secret("api", value)
    await admin.add_mapping(reader.entity_key, ["api"])
    doomed, kept = await sealed_at(nc, 2), await sealed_at(nc, 1)

    # Before: the doomed ciphertext is in the put event (base64 in JSON), in the bucket
    # (raw) and on disk in both streams' blocks. The same scans find the kept one.
    for sealed in (doomed, kept):
        assert await messages_holding(nc, EVENTS, sealed) != []
        assert await messages_holding(nc, SECRETS_KV, sealed) != []
        on_disk = await wait_on_disk(server_dir, sealed)
        assert any(EVENTS in path for path in on_disk), on_disk
        assert any(SECRETS_KV in path for path in on_disk), on_disk

    assert await admin.destroy("api", version=2) == [2]

    await raises(SecretNotFound, backend.get(reader, "api", version="2"))
    assert await value_of(backend, reader, "api", "1") == ("1", "api-key-one")
    assert await value_of(backend, reader, "api", "3") == ("3", "api-key-three")
    assert await value_of(backend, reader, "api") == ("3", "api-key-three")

    for stream in (EVENTS, SECRETS_KV, STATE_KV):
        assert await messages_holding(nc, stream, doomed) == [], stream
    assert files_holding(server_dir, doomed) == []
    assert await messages_holding(nc, SECRETS_KV, kept) == [1]
    assert files_holding(server_dir, kept) != []
    # The log keeps that it happened, without the bytes: a gap where the put was, and
    # the destroy event naming the version.
    entries = await log_entries(nc, backend.keys)
    assert [e.event is None for e in entries] == [False, True, False, False, False]
    destroyed = entries[-1].event
    assert isinstance(destroyed, SecretDestroyed)
    assert (destroyed.name, destroyed.versions, destroyed.all) == ("api", (2,), False)


async def test_destroying_an_undeleted_copy_shreds_the_original_too(
    backend: Clients, reader: Identity, nats_server: NatsServer
) -> None:
    admin, nc = backend.admin, backend.admin.nc
    server_dir = nats_server.config.store_dir.parent
    await admin.put_secret("tls", "key-one")
    await admin.put_secret("tls", "key-two")
    await admin.delete("tls")
    assert await admin.undelete("tls") == 4  # a copy of version 2's bytes
    await admin.add_mapping(reader.entity_key, ["tls"])
    doomed = await sealed_at(nc, 2)
    assert await sealed_at(nc, 4) == doomed
    assert await wait_on_disk(server_dir, doomed) != []

    assert await admin.destroy("tls", version=4) == [2, 4]

    for version in ("2", "4"):
        await raises(SecretNotFound, backend.get(reader, "tls", version=version))
    for stream in (EVENTS, SECRETS_KV):
        assert await messages_holding(nc, stream, doomed) == [], stream
    assert files_holding(server_dir, doomed) == []
    # What is left of the key is version 1 and the delete marker after it: the bucket
    # shows the secret deleted, and so does the backend; undelete brings version 1 back.
    await raises(SecretNotFound, backend.get(reader, "tls"))
    (listed,) = await admin.list_secrets()
    assert (listed.deleted, listed.versions) == (True, 1)
    assert await admin.undelete("tls") == 5
    assert await value_of(backend, reader, "tls") == ("5", "key-one")


async def test_destroying_a_put_made_after_a_delete_does_not_resurrect_the_deleted_value(
    backend: Clients, reader: Identity
) -> None:
    admin = backend.admin
    await admin.put_secret("token", "revoked-token")
    await admin.delete("token")
    assert await admin.put_secret("token", "fresh-token") == 3
    await admin.add_mapping(reader.entity_key, ["token"])
    assert await value_of(backend, reader, "token") == ("3", "fresh-token")

    assert await admin.destroy("token", version=3) == [3]

    # The newest entry left is the delete marker: the deleted value stays deleted.
    await raises(SecretNotFound, backend.get(reader, "token"))
    await raises(SecretNotFound, backend.get(reader, "token", version="1"))
    (listed,) = await admin.list_secrets()
    assert (listed.name, listed.deleted) == ("token", True)


async def test_destroy_all_removes_the_secret_and_keeps_the_record_of_it(
    backend: Clients, reader: Identity, nats_server: NatsServer
) -> None:
    admin, nc = backend.admin, backend.admin.nc
    server_dir = nats_server.config.store_dir.parent
    await admin.put_secret("old", "old-one")
    await admin.put_secret("old", "old-two")
    await admin.delete("old")
    await admin.undelete("old")
    await admin.put_secret("other", "other-value")
    await admin.add_mapping(reader.entity_key, ["old", "other"])
    doomed = [await sealed_at(nc, 1), await sealed_at(nc, 2)]
    for sealed in doomed:
        assert await wait_on_disk(server_dir, sealed) != []

    assert await admin.destroy("old", all=True) == [1, 2, 3, 4]

    assert [item.name for item in await admin.list_secrets()] == ["other"]
    for version in (None, "1", "2", "3", "4"):
        await raises(SecretNotFound, backend.get(reader, "old", version=version))
    assert await value_of(backend, reader, "other") == ("5", "other-value")
    subjects = [m.subject for m in await messages_in(nc, SECRETS_KV)]
    assert subjects == ["$KV.WASMCLOUD_SECRETS.other"]
    for sealed in doomed:
        for stream in (EVENTS, SECRETS_KV):
            assert await messages_holding(nc, stream, sealed) == [], stream
        assert files_holding(server_dir, sealed) == []
    await raises(SecretNotFound, admin.undelete("old"))
    await raises(SecretNotFound, admin.destroy("old", all=True))

    # The audit trail keeps that it happened: the destroy event lists every revision.
    destroyed = (await log_entries(nc, backend.keys))[-1].event
    assert isinstance(destroyed, SecretDestroyed)
    assert (destroyed.name, destroyed.versions, destroyed.all) == ("old", (1, 2, 3, 4), True)
    assert destroyed.admin_key == backend.keys.transit.public_key
    assert destroyed.request_id

    # The name is free again; revisions go on counting.
    assert await admin.put_secret("old", "reborn") == 6
    assert await value_of(backend, reader, "old") == ("6", "reborn")


async def test_refused_destroys_change_nothing(backend: Clients) -> None:
    admin, nc = backend.admin, backend.admin.nc
    await admin.put_secret("a", "a-one")
    await admin.put_secret("b", "b-one")
    await admin.delete("a")
    start = await head(nc)

    await raises(SecretNotFound, admin.destroy("missing", version=1))
    await raises(SecretNotFound, admin.destroy("missing", all=True))
    await raises(SecretNotFound, admin.destroy("a", version=3))  # a delete marker
    await raises(SecretNotFound, admin.destroy("a", version=2))  # b's revision
    await raises(SecretNotFound, admin.destroy("a", version=99))
    await raises(InvalidRequest, admin.destroy("a"))  # neither a version nor all
    await raises(InvalidRequest, admin.destroy("a", version=1, all=True))

    assert await head(nc) == start
    assert len(await messages_in(nc, SECRETS_KV)) == 3


# --- who may, and who wins --------------------------------------------------------------


async def test_two_admins_deleting_one_secret_at_once_exactly_one_wins(
    nats_server: NatsServer,
) -> None:
    second = XKey.generate()
    keys = Keys()
    async with (
        running_backend(nats_server.url, keys, admin_xkeys=(second.public_key,)) as one,
        running_backend(nats_server.url, keys, admin_xkeys=(second.public_key,)) as two,
    ):
        admins = [one.admin, AdminClient(two.admin.nc, two.names, second)]
        rounds = 6
        for n in range(rounds):
            await admins[0].put_secret(f"s{n}", "value")
        outcomes: dict[int, list[int | str]] = {n: [] for n in range(rounds)}

        async def delete(admin: AdminClient, n: int) -> None:
            try:
                outcomes[n].append(await admin.delete(f"s{n}"))
            except SecretNotFound:
                outcomes[n].append("SecretNotFound")

        async with anyio.create_task_group() as tg:
            for n in range(rounds):
                for admin in admins:
                    tg.start_soon(delete, admin, n)

        for n, results in outcomes.items():
            wins = [r for r in results if isinstance(r, int)]
            assert len(wins) == 1, (n, results)
            assert results.count("SecretNotFound") == 1, (n, results)
        deletes = [
            e.event
            for e in await log_entries(one.admin.nc, keys)
            if isinstance(e.event, SecretDeleted)
        ]
        assert sorted(e.name for e in deletes) == [f"s{n}" for n in range(rounds)]


LifecycleCall = Callable[[AdminClient], Awaitable[Any]]
LIFECYCLE_CALLS: dict[str, LifecycleCall] = {
    "list": lambda admin: admin.list_secrets(),
    "mappings": lambda admin: admin.mappings(),
    "mappings PUBKEY": lambda admin: admin.mappings(Identity().entity_key),
    "delete": lambda admin: admin.delete("kept"),
    "undelete": lambda admin: admin.undelete("deleted"),
    "destroy --version": lambda admin: admin.destroy("kept", version=1),
    "destroy --all": lambda admin: admin.destroy("kept", all=True),
}


async def test_lifecycle_operations_sealed_by_a_non_admin_key_are_unauthorized(
    backend: Clients, reader: Identity
) -> None:
    admin, nc = backend.admin, backend.admin.nc
    await admin.put_secret("kept", "kept-value")
    await admin.put_secret("deleted", "deleted-value")
    await admin.delete("deleted")
    await admin.add_mapping(reader.entity_key, ["kept"])
    start = await head(nc)
    stranger = await connect(backend.backend.config.nats, name="stranger", persistent=False)
    try:
        intruder = AdminClient(stranger, backend.names, XKey.generate())
        for operation, call in LIFECYCLE_CALLS.items():
            try:
                await call(intruder)
            except Unauthorized:
                continue
            pytest.fail(f"{operation} was served to a key that is not an admin key")
    finally:
        await stranger.close()
    assert await head(nc) == start
    assert await value_of(backend, reader, "kept") == ("1", "kept-value")
    listing = {item.name: item.deleted for item in await admin.list_secrets()}
    assert listing == {"deleted": True, "kept": False}


async def test_a_backend_restarted_after_a_destroy_serves_and_writes(
    nats_server: NatsServer, reader: Identity
) -> None:
    keys = Keys()
    async with running_backend(nats_server.url, keys) as clients:
        for value in ("v-one", "v-two", "v-three"):
            await clients.admin.put_secret("cfg", value)
        await clients.admin.add_mapping(reader.entity_key, ["cfg"])
        assert await clients.admin.destroy("cfg", version=2) == [2]
        listing = await clients.admin.list_secrets()
    # The restarted backend folds the log with the erased put as a gap, and re-applies
    # the destroy's erasures to messages that are already gone.
    async with running_backend(nats_server.url, keys) as restarted:
        assert await restarted.admin.list_secrets() == listing
        assert await value_of(restarted, reader, "cfg") == ("3", "v-three")
        assert await value_of(restarted, reader, "cfg", "1") == ("1", "v-one")
        await raises(SecretNotFound, restarted.get(reader, "cfg", version="2"))
        assert await restarted.admin.put_secret("cfg", "v-four") == 4
        assert await value_of(restarted, reader, "cfg") == ("4", "v-four")
