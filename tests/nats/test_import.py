"""Taking over the original Rust secrets-nats-kv: `import`, and no blind start on its buckets.

Every test builds the original's buckets as the original does (tests/support/original.py:
KV-API stream config, values sealed by the encryption key to itself, JSON arrays of
names in the state bucket), with a key written more than 64 times, a deleted key, a
purged key, a non-UTF-8 value and two entities, then drives the real CLI and backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from events.log import EventLog
from events.types import OriginalImported
from projections.kv import BUCKET_AHEAD
from secrets_nats_kv import wire
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import SecretNotFound, Unauthorized, UpstreamError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from support.crash import program as crash_program
from support.harness import (
    CLI,
    REPO,
    Clients,
    Identity,
    Keys,
    backend_flags,
    cli_env,
    fresh_names,
    run_cli,
    running_backend,
)
from support.leakcheck import remember
from support.original import Original, stock_view, stream_config, write_behind_the_log

pytestmark = pytest.mark.anyio

BINARY = bytes([0xFF, 0xFE, 0x00, 0x80, 0xC3, 0x28]) + b"not text \xa0"


@dataclass
class Built:
    """The original's buckets as built, and what a reader of them must find."""

    names: BackendNames
    keys: Keys
    readers: tuple[Identity, Identity]
    versions: dict[str, dict[int, bytes]] = field(default_factory=dict)  # live revisions
    dropped: dict[str, list[int]] = field(default_factory=dict)  # revisions history lost
    deleted: set[str] = field(default_factory=set)
    mappings: dict[str, set[str]] = field(default_factory=dict)
    last_revision: int = 0

    def args(self, url: str) -> list[str]:
        """For `run` and the commands that read the buckets themselves."""
        return backend_flags(url, self.names, bucket=True)

    def client_args(self, url: str) -> list[str]:
        """For the commands a backend answers: its bucket is its own (`-b` is refused)."""
        return backend_flags(url, self.names)

    def every_version(self) -> Iterator[tuple[Identity, str, int, bytes]]:
        """(the reader mapped to it, name, revision, value) of each version to be served."""
        first, second = self.readers
        for name, versions in self.versions.items():
            reader = first if name in self.mappings[first.entity_key] else second
            for revision, value in versions.items():
                yield reader, name, revision, value


async def build_original(nc: NATS, *, deny_delete: bool = True) -> Built:
    keys = Keys()
    names = fresh_names()
    original = await Original(nc, keys.encryption, names, remember=remember).create(
        deny_delete=deny_delete
    )
    built = Built(names, keys, (Identity(), Identity()))
    revisions: list[int] = []
    for i in range(70):  # more than the 64-entry history: the first six are dropped
        value = f"api-token-{i:03d}-{os.urandom(6).hex()}".encode()
        revisions.append(await original.put("api-token", value))
        built.versions.setdefault("api-token", {})[revisions[-1]] = value
        if i == 10:
            built.versions["binary-key"] = {await original.put("binary-key", BINARY): BINARY}
    for revision in revisions[:6]:
        del built.versions["api-token"][revision]
    built.dropped["api-token"] = revisions[:6]
    gone = await original.put("gone", b"deleted-value-1")
    await original.delete("gone")
    built.deleted.add("gone")
    built.dropped["gone"] = [gone]  # a deleted secret's versions are not served
    purged = [await original.put("purged", b"purged-value-1"), await original.put("purged", b"x2")]
    await original.purge("purged")  # rolls the key's history up: both puts are gone
    built.deleted.add("purged")
    built.dropped["purged"] = purged
    text = "hunter2-ünïcode".encode()
    built.versions["db-password"] = {await original.put("db-password", text): text}
    first, second = built.readers
    await original.set_mapping(first.entity_key, ["api-token", "binary-key"])
    await original.set_mapping(second.entity_key, ["gone"])
    await original.set_mapping(second.entity_key, ["db-password", "purged", "gone"])
    built.mappings = {
        first.entity_key: {"api-token", "binary-key"},
        second.entity_key: {"db-password", "purged", "gone"},
    }
    built.last_revision = (await stream_state(nc, f"KV_{names.secrets_bucket}", 5)).last_seq
    return built


async def views(nc: NATS, names: BackendNames) -> tuple[object, ...]:
    """What a stock KV reader sees of both buckets (mapping values as sets of names)."""
    secrets = await stock_view(nc, names.secrets_bucket)
    state = await stock_view(nc, names.state_bucket)
    mappings = {
        key: [(k, r, sorted(json.loads(v)) if v else None, op) for k, r, v, op in history]
        for key, history in state.items()
    }
    return secrets, mappings


async def bounds(nc: NATS, names: BackendNames) -> tuple[object, ...]:
    streams = (f"KV_{names.secrets_bucket}", f"KV_{names.state_bucket}")
    return tuple([await stream_state(nc, s, 5) for s in streams])


async def imported(nc: NATS, url: str) -> Built:
    """An original's buckets, built and then taken over by `import` (which must succeed)."""
    built = await build_original(nc)
    assert run_cli("import", *built.args(url), env=cli_env(built.keys)).returncode == 0
    return built


@contextlib.asynccontextmanager
async def serving_an_import(nc: NATS, url: str) -> AsyncIterator[tuple[Built, Clients]]:
    """`imported`, with a backend running on what it took over."""
    built = await imported(nc, url)
    async with running_backend(url, built.keys, names=built.names) as clients:
        yield built, clients


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The failure's one line (`run` may log warnings before it); never a traceback."""
    err = result.stderr.decode()
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in err
    failures = [line for line in err.splitlines() if line.startswith("secrets-nats-kv: ")]
    assert len(failures) == 1, err
    assert failures[0].startswith("secrets-nats-kv: error: ")
    return failures[0]


async def log_exists(nc: NATS, names: BackendNames) -> bool:
    return await EventLog(nc, backend_name=names.name, barrier=None).exists()


@pytest.fixture
async def nc(module_nats_server: NatsServer) -> NATS:
    client = await connect(
        NatsOptions(servers=(module_nats_server.url,)), name="test", persistent=False
    )
    yield client  # type: ignore[misc]
    await client.close()


# --- a blind start is refused ---------------------------------------------------------


@pytest.mark.parametrize("deny_delete", [True, False], ids=["as-made", "deletes-allowed"])
async def test_run_on_the_originals_buckets_refuses_naming_import_and_changes_nothing(
    module_nats_server: NatsServer, nc: NATS, deny_delete: bool
) -> None:
    built = await build_original(nc, deny_delete=deny_delete)
    before = (await views(nc, built.names), await bounds(nc, built.names))
    config_before = await stream_config(nc, built.names.secrets_bucket)
    url = module_nats_server.url
    result = run_cli("run", *built.args(url), env=cli_env(built.keys), timeout=60)
    err = one_line(result)
    assert "secrets-nats-kv import" in err
    assert "Traceback" not in err
    # A rebuild would drop them, a rotation rewrite them: refused the same way; so are the
    # client commands that write, which no backend can answer.
    env = cli_env(built.keys)
    assert "import" in one_line(run_cli("rebuild", *built.args(url), env=env))
    rotate_env = cli_env(built.keys, NEW_ENCRYPTION_XKEY_SEED=Keys().encryption.seed)
    assert "import" in one_line(run_cli("rotate-key", *built.args(url), env=rotate_env))
    put = run_cli("put", "api-token", "--string", "x", *built.client_args(url), env=env)
    assert "secrets-nats-kv import" in one_line(put)
    mapping = ("add-mapping", built.readers[0].entity_key, "--secret", "gone")
    assert "secrets-nats-kv import" in one_line(run_cli(*mapping, *built.client_args(url), env=env))
    assert (await views(nc, built.names), await bounds(nc, built.names)) == before
    assert await stream_config(nc, built.names.secrets_bucket) == config_before
    assert not await log_exists(nc, built.names)


# --- dry run, wrong key ---------------------------------------------------------------


async def test_dry_run_reports_what_it_would_import_and_changes_nothing(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    built = await build_original(nc)
    before = (await views(nc, built.names), await bounds(nc, built.names))
    result = run_cli(
        "import", "--dry-run", *built.args(module_nats_server.url), env=cli_env(built.keys)
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    # api-token, binary-key, gone, purged, db-password: 64 + 1 + 1 (the deleted one's
    # put) + 1 versions (the purge took purged's); gone and purged deleted; two entities.
    assert "would import 5 secrets (67 versions, 2 deleted" in out, out
    assert "2 mappings" in out
    assert "bytes" in out
    assert f"next version {built.last_revision + 1}" in out
    assert (await views(nc, built.names), await bounds(nc, built.names)) == before
    assert not await log_exists(nc, built.names)


async def test_the_wrong_encryption_key_is_one_line_and_writes_nothing(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    built = await build_original(nc)
    before = (await views(nc, built.names), await bounds(nc, built.names))
    wrong = Keys()
    env = cli_env(wrong)
    err = one_line(run_cli("import", *built.args(module_nats_server.url), env=env))
    assert "does not open with ENCRYPTION_XKEY_SEED" in err
    assert "wrong key" in err
    assert (await views(nc, built.names), await bounds(nc, built.names)) == before
    assert not await log_exists(nc, built.names)


# --- the import -------------------------------------------------------------------------


async def test_import_keeps_every_version_number_value_deletion_and_mapping(
    module_nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    built = await build_original(nc)
    url = module_nats_server.url
    before = await views(nc, built.names)
    result = run_cli("import", *built.args(url), env=cli_env(built.keys), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("imported 5 secrets (67 versions, 2 deleted")

    # The stock KV reader's view is what it was; the streams are the project's now.
    assert await views(nc, built.names) == before
    for bucket in (built.names.secrets_bucket, built.names.state_bucket):
        assert not (await stream_config(nc, bucket)).deny_delete

    # Once done, a second import is a no-op in one line.
    again = run_cli("import", *built.args(url), env=cli_env(built.keys))
    assert again.returncode == 0
    assert "nothing to do" in again.stdout.decode()
    assert again.stdout.decode().count("\n") == 1
    assert await views(nc, built.names) == before

    async with running_backend(url, built.keys, names=built.names) as clients:
        first, second = built.readers
        for name, versions in built.versions.items():
            reader = first if name in built.mappings[first.entity_key] else second
            latest = max(versions)
            for revision, value in versions.items():
                got = await clients.get(reader, name, version=str(revision))
                assert (got.version, _value(got)) == (str(revision), value)
            got = await clients.get(reader, name)
            assert (got.version, _value(got)) == (str(latest), versions[latest])
        binary = await clients.get(first, "binary-key")
        assert binary.binary_secret == list(BINARY)
        assert binary.string_secret is None
        for revision in built.dropped["api-token"]:
            with pytest.raises(SecretNotFound):
                await clients.get(first, "api-token", version=str(revision))
        for name in built.deleted:
            with pytest.raises(SecretNotFound):
                await clients.get(second, name)
        # Mappings are exactly what the state bucket held, no wider.
        assert await clients.admin.mappings(None) == {
            k: sorted(v) for k, v in built.mappings.items()
        }
        with pytest.raises(Unauthorized):
            await clients.get(second, "api-token")

        # The numbering goes on from the original's last revision.
        remember(b"next-after-import", "value")
        assert await clients.admin.put_secret("api-token", "next-after-import") == (
            built.last_revision + 1
        )
        # Destroy works on the imported bucket (message deletes are allowed now).
        oldest = min(built.versions["api-token"])
        assert await clients.admin.destroy("api-token", version=oldest) == [oldest]
        with pytest.raises(SecretNotFound):
            await clients.get(first, "api-token", version=str(oldest))

    # The CLI's get reads the bucket as the original's did, pinned versions included.
    pinned = sorted(built.versions["api-token"])[3]
    got = run_cli(
        "get",
        "api-token",
        "--secret-version",
        str(pinned),
        *built.args(url),
        env=cli_env(built.keys),
    )
    assert got.returncode == 0
    assert got.stdout == built.versions["api-token"][pinned] + b"\n"

    # The audit log: the import's own record first, then the imported history, no value.
    audit = run_cli("audit", "export", *built.args(url), env=cli_env(built.keys))
    assert audit.returncode == 0, audit.stderr
    records = [json.loads(line) for line in audit.stdout.decode().splitlines()]
    head = records[0]
    assert head["type"] == "original_imported"
    assert head["seq"] == 1
    assert head["admin_key"] == built.keys.transit.public_key
    assert head["time"].startswith("20")  # when it ran (ISO time)
    assert head["counts"]["secrets"] == 5
    assert head["counts"]["versions"] == 67
    assert head["counts"]["mappings"] == 2
    puts = [r for r in records if r["type"] == "secret_put" and r.get("request_id", "")]
    imported = [r for r in puts if r["request_id"].startswith("original:")]
    assert [r["revision"] for r in imported] == [int(r["request_id"][9:]) for r in imported]
    assert len(imported) == 66  # the 67th, destroyed above, is an erased entry now
    assert [r["revision"] for r in records if r["type"] == "erased"] == [oldest]
    for versions in built.versions.values():
        for value in versions.values():
            assert value not in audit.stdout


def _value(secret: wire.Secret) -> bytes:
    if secret.string_secret is not None:
        return secret.string_secret.encode()
    return bytes(secret.binary_secret or [])


# --- the KV writer never goes quiet ------------------------------------------------------


async def test_a_write_the_log_does_not_explain_is_an_incident_that_stops_writes(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    url = module_nats_server.url
    async with serving_an_import(nc, url) as (built, clients):
        # An old instance still running writes the bucket behind the log's back.
        await write_behind_the_log(
            nc, built.names.secrets_bucket, "api-token", b"sealed-by-someone-else"
        )
        remember(b"after-foreign-write", "value")
        with pytest.raises(UpstreamError):
            await clients.admin.put_secret("api-token", "after-foreign-write")
        incident = clients.backend.health.incidents[BUCKET_AHEAD]
        assert incident.blocks_writes
        assert "does not explain" in incident.detail
        log_ = EventLog(
            nc,
            backend_name=built.names.name,
            barrier=Barrier(built.keys.encryption),
        )
        head = await log_.head()
        with pytest.raises(UpstreamError):  # refused up front: nothing appended
            await clients.admin.put_secret("other", "after-foreign-write")
        assert await log_.head() == head
    # A restart finds the bucket ahead of the log and refuses, naming import.
    err = one_line(run_cli("run", *built.args(url), env=cli_env(built.keys), timeout=60))
    assert "import" in err
    assert "does not explain" in err


# --- killed part way, twice ---------------------------------------------------------------


async def test_an_import_killed_twice_part_way_finishes_with_nothing_lost_or_doubled(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    keys, names = Keys(), fresh_names()
    original = await Original(nc, keys.encryption, names, remember=remember).create()
    reader = Identity()
    expected: dict[str, tuple[int, bytes]] = {}
    for i in range(1500):
        name = f"s{i:04d}"
        value = f"value-{i:04d}".encode()
        expected[name] = (await original.put(name, value, track=False), value)
    await original.set_mapping(reader.entity_key, sorted(expected))
    args = backend_flags(module_nats_server.url, names, bucket=True)
    log_ = EventLog(nc, backend_name=names.name, barrier=Barrier(keys.encryption))

    # A real SIGKILL, sent once 700 of its appends have been seen on the log's subjects.
    seen, enough = 0, anyio.Event()

    async def count(_msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= 700:
            enough.set()

    watch = await nc.subscribe(f"{log_.prefix}.>", cb=count)
    await nc.flush()
    async with await anyio.open_process(
        [*CLI, "import", *args], env=cli_env(keys), cwd=REPO
    ) as proc:
        try:
            with anyio.fail_after(60):
                await enough.wait()
            proc.send_signal(signal.SIGKILL)
        finally:
            await proc.wait()
            await watch.unsubscribe()
    assert proc.returncode == -signal.SIGKILL  # killed mid-way: it had seconds of work left
    assert await log_.head() >= 1  # something was written before the kill

    # Then killed again where any re-run must pass: folding the new buckets.
    crashed = run_cli("import", *args, env=cli_env(keys), program=crash_program("refold:900"))
    assert crashed.returncode == 1, crashed.stderr
    assert not crashed.stdout, crashed.stdout
    assert await log_.head() == 1502, crashed.stderr  # the whole log; the buckets mid-replacement
    refused = run_cli("run", *args, env=cli_env(keys), timeout=60)
    assert "unfinished import" in one_line(refused), crashed.stderr

    done = run_cli("import", *args, env=cli_env(keys), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("finished the import of 1500 secrets (1500 versions")
    assert await log_.head() == 1502  # nothing doubled
    assert len({e.seq for e in await log_.read_all()}) == 1502
    # Appended across three runs, the chain carried from run to run: the log verifies.
    verified = run_cli("verify", *args, env=cli_env(keys), timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert "event log verified: 1502 entries to #1502" in verified.stdout.decode()

    async with running_backend(module_nats_server.url, keys, names=names) as clients:
        for name, (revision, value) in expected.items():
            got = await clients.get(reader, name, version=str(revision))
            assert (got.version, got.string_secret) == (str(revision), value.decode())
    for name in ("s0000", "s0777", "s1499"):
        revision, value = expected[name]
        got = run_cli("get", name, *args, env=cli_env(keys))
        assert got.returncode == 0, got.stderr
        assert got.stdout == value + b"\n"


# --- an old instance that writes during the import; a log that is not an import's ------


async def test_a_write_by_an_old_instance_before_the_replace_is_read_again_not_lost(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    keys, names = Keys(), fresh_names()
    original = Original(nc, keys.encryption, names, remember=remember)
    await original.create()
    reader = Identity()
    first = await original.put("app-key", b"first-value-0001")
    await original.set_mapping(reader.entity_key, ["app-key", "late"])
    args = backend_flags(module_nats_server.url, names, bucket=True)
    crashed = run_cli("import", *args, env=cli_env(keys), program=crash_program("appended"))
    assert crashed.returncode == 1
    # The log is whole but nothing replaced; an old instance still running writes.
    assert (await stream_config(nc, names.secrets_bucket)).deny_delete
    late = await original.put("late", b"written-by-the-old-instance")
    done = run_cli("import", *args, env=cli_env(keys))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("imported 2 secrets (2 versions")
    async with running_backend(module_nats_server.url, keys, names=names) as clients:
        got = await clients.get(reader, "late")
        assert (got.version, got.string_secret) == (str(late), "written-by-the-old-instance")
        got = await clients.get(reader, "app-key", version=str(first))
        assert got.string_secret == "first-value-0001"


async def test_import_refuses_a_log_it_did_not_write_and_a_log_under_another_key(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    url = module_nats_server.url
    built = await imported(nc, url)
    wrong = cli_env(built.keys, ENCRYPTION_XKEY_SEED=Keys().encryption.seed)
    assert "does not verify" in one_line(run_cli("import", *built.args(url), env=wrong))
    # A backend that already ran (its own log) is not imported into.
    keys, names = Keys(), fresh_names()
    async with running_backend(url, keys, names=names) as clients:
        remember(b"own-value-0001", "value")
        await clients.admin.put_secret("own", "own-value-0001")
    args = backend_flags(url, names, bucket=True)
    err = one_line(run_cli("import", *args, env=cli_env(keys)))
    assert "no import wrote" in err


@pytest.mark.parametrize("point", ["append:1", "append:40", "appended", "dropped", "refold:30"])
async def test_killed_at_any_point_then_run_again_the_import_is_whole(
    module_nats_server: NatsServer, nc: NATS, point: str
) -> None:
    built = await build_original(nc)
    url = module_nats_server.url
    before = await views(nc, built.names)
    crashed = run_cli(
        "import", *built.args(url), env=cli_env(built.keys), program=crash_program(point)
    )
    assert crashed.returncode == 1
    assert not crashed.stdout
    done = run_cli("import", *built.args(url), env=cli_env(built.keys), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "5 secrets (67 versions, 2 deleted" in done.stdout.decode()
    assert await views(nc, built.names) == before
    entries = await EventLog(
        nc,
        backend_name=built.names.name,
        barrier=Barrier(built.keys.encryption),
    ).read_all()
    record = entries[0].event
    assert isinstance(record, OriginalImported)
    assert [e.seq for e in entries] == list(range(1, record.entries + 2))  # none doubled
    async with running_backend(url, built.keys, names=built.names) as clients:
        for reader, name, revision, value in built.every_version():
            got = await clients.get(reader, name, version=str(revision))
            assert _value(got) == value


async def test_an_imported_deployment_rotates_its_key_keeping_every_number(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    url = module_nats_server.url
    built = await imported(nc, url)
    new = Keys(transit=built.keys.transit)
    env = cli_env(built.keys, NEW_ENCRYPTION_XKEY_SEED=new.encryption.seed)
    rotated = run_cli("rotate-key", *built.args(url), env=env, timeout=120)
    assert rotated.returncode == 0, rotated.stderr
    async with running_backend(url, new, names=built.names) as clients:
        for reader, name, revision, value in built.every_version():
            got = await clients.get(reader, name, version=str(revision))
            assert _value(got) == value
        for revision in built.dropped["api-token"]:
            with pytest.raises(SecretNotFound):
                await clients.get(built.readers[0], "api-token", version=str(revision))
        remember(b"after-rotation-0001", "value")
        assert await clients.admin.put_secret("api-token", "after-rotation-0001") == (
            built.last_revision + 1
        )


async def test_a_mapping_written_behind_the_logs_back_stops_writes_and_a_restart(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    url = module_nats_server.url
    async with serving_an_import(nc, url) as (built, clients):
        first = built.readers[0]
        # An old instance still running maps an entity behind the log's back.
        await write_behind_the_log(
            nc, built.names.state_bucket, first.entity_key, b'["everything"]'
        )
        with pytest.raises(UpstreamError):
            await clients.admin.add_mapping(first.entity_key, ["db-password"])
        assert clients.backend.health.incidents[BUCKET_AHEAD].blocks_writes
    err = one_line(run_cli("run", *built.args(url), env=cli_env(built.keys), timeout=60))
    assert "holds a mapping the event log does not explain" in err


async def test_after_a_foreign_write_a_rebuild_repairs_the_bucket_and_writes_resume(
    module_nats_server: NatsServer, nc: NATS
) -> None:
    url = module_nats_server.url
    async with serving_an_import(nc, url) as (built, clients):
        await write_behind_the_log(
            nc, built.names.secrets_bucket, "api-token", b"sealed-by-someone-else"
        )
        remember(b"stored-but-not-written", "value")
        with pytest.raises(UpstreamError):
            await clients.admin.put_secret("api-token", "stored-but-not-written")
        health = clients.backend.health
        assert BUCKET_AHEAD in health.incidents
        rebuilt = run_cli("rebuild", *built.args(url), env=cli_env(built.keys), timeout=60)
        assert rebuilt.returncode == 0, rebuilt.stderr
        head = await EventLog(nc, backend_name=built.names.name, barrier=None).head()
        writer = clients.backend.writer
        assert writer is not None
        with anyio.fail_after(20):
            await writer.wait_applied(head)  # its retry finds the revision repaired
        assert BUCKET_AHEAD not in health.incidents
        got = await clients.get(built.readers[0], "api-token")
        assert (got.version, got.string_secret) == (
            str(built.last_revision + 1),
            "stored-but-not-written",
        )
        remember(b"after-the-repair-01", "value")
        assert await clients.admin.put_secret("api-token", "after-the-repair-01") == (
            built.last_revision + 2
        )
    view = await stock_view(nc, built.names.secrets_bucket)
    assert all(value != b"sealed-by-someone-else" for _, _, value, _ in view["api-token"])
