"""A running backend through an online key rotation, on real nats-servers.

The backend runs in-process with the current and the next key; `rotate-key --online`
runs as the real CLI process, killed at its crash points where the test needs the
rotation to stand still (after the fence, after the refill), then run again to finish.
Everything is read back through the backend: gets never fail, writes are refused while
fenced (one line from the CLI), and after the swap the backend serves and writes under
the new key, with no incident. Restarts: with both keys the new one is adopted, with
only the old one `run` refuses in one line, and a start during the swap waits for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from nats.aio.client import Client as NATS

from actors.backend import Backend
from actors.keyswitch import ROTATION_KEY_UNKNOWN
from events.log import EventLog, stream_name, subject_prefix
from events.types import FenceLifted, SecretPut, WritesFenced, decode_event
from projections.foreign import UnexplainedEntries
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import (
    DecryptionError,
    ProtocolError,
    RotationInProgress,
    StorageError,
)
from secrets_nats_kv.nats.reader import read_stream
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.xkeys import SealBox, XKey
from support.cliproc import one_line_error
from support.harness import (
    Clients,
    Identity,
    Keys,
    backend_config,
    cli_env,
    run_cli,
    spawn_run,
    wait_until_answering,
)
from support.harness import running_backend as backend_on
from support.leakcheck import exempt, remembered
from support.original import write_behind_the_log
from support.rotation import (
    NAMES,
    client,
    head,
    new_key,
    remembered_keys,
    rotate_cli,
)

if TYPE_CHECKING:
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio

LIVE = stream_name(NAMES.name)
SECRETS = [f"k-{i}" for i in range(6)]


async def store(clients: Clients, reader: Identity) -> dict[str, tuple[str, bytes]]:
    """A few secrets, string and binary, readable by `reader`: name -> (version, bytes)."""
    values: dict[str, tuple[str, bytes]] = {}
    for i, name in enumerate(SECRETS):
        raw = remembered(f"value {i} {time.time_ns()}", "secret value").encode()
        value: str | bytes = raw if i % 2 else raw.decode()
        values[name] = (str(await clients.admin.put_secret(name, value)), raw)
    await clients.admin.add_mapping(reader.entity_key, SECRETS)
    return values


async def serves(clients: Clients, reader: Identity, values: dict[str, tuple[str, bytes]]) -> None:
    for name, (version, raw) in values.items():
        secret = await clients.get(reader, name)
        assert (secret.version, secret.value_bytes()) == (version, raw), name


async def caught_up(clients: Clients, nc: NATS) -> int:
    """Wait until the backend's view has folded the live log to its head; the head."""
    seq = await head(nc, LIVE)
    with anyio.fail_after(20):
        await clients.backend.view.wait_applied(seq)
    return seq


def keys_of(backend: Backend) -> tuple[object, object]:
    keys = backend.status()["public_keys"]
    assert isinstance(keys, dict)
    return keys["encryption"], keys["next_encryption"]


def put_line(url: str, keys: Keys) -> str:
    proc = run_cli(
        "put", SECRETS[0], "--string", remembered("fenced value", "secret value"),
        "--nats-address", url, env=cli_env(keys),
    )  # fmt: skip
    return one_line_error(proc, "key rotation is in progress", "retry")


async def only_under(nc: NATS, new: XKey, old: XKey) -> int:
    """Every log entry tagged for `new` and none for `old`; every stored value opens with
    `new` and not with `old` (the live log and the secrets bucket). How many values."""
    new_auth, old_auth, new_box, old_box = (
        Barrier(new),
        Barrier(old),
        SealBox(new, new),
        SealBox(old, old),
    )
    blobs: list[bytes] = []
    async for raw in read_stream(nc, LIVE, f"{subject_prefix(NAMES.name)}.>"):
        tag = raw.headers.get(TAG_HEADER)
        assert new_auth.verify(raw.seq, raw.data, tag), raw.seq
        assert not old_auth.verify(raw.seq, raw.data, tag), raw.seq
        event = decode_event(raw.data)
        if isinstance(event, SecretPut):
            blobs.append(event.sealed)
    async for raw in read_stream(
        nc, kv_stream(NAMES.secrets_bucket), f"$KV.{NAMES.secrets_bucket}.>"
    ):
        if raw.data:
            blobs.append(raw.data)
    for blob in blobs:
        new_box.open(blob)
        with pytest.raises(DecryptionError):
            old_box.open(blob)
    return len(blobs)  # fmt: skip


async def test_gets_never_fail_through_an_online_rotation_and_writes_go_on_under_the_new_key(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys, next_encryption_key=new) as clients, client(url) as nc:
        assert keys_of(clients.backend) == (keys.encryption.public_key, new.public_key)
        values = await store(clients, reader)
        failures: list[str] = []
        served = 0
        rotated = anyio.Event()

        async def read_all_the_time() -> None:
            nonlocal served
            while not rotated.is_set():
                for name, (version, raw) in values.items():
                    try:
                        secret = await clients.get(reader, name)
                    except ProtocolError as exc:
                        failures.append(f"{name}: {exc}")
                        continue
                    if (secret.version, secret.value_bytes()) != (version, raw):
                        failures.append(f"{name}: version {secret.version}")
                    served += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all_the_time)
            proc = await rotate_cli(url, keys.encryption, new, "--online")
            marker = await caught_up(clients, nc)
            rotated.set()
        assert proc.returncode == 0, proc.stderr
        assert failures == []
        assert served >= len(values)
        assert keys_of(clients.backend) == (new.public_key, None)
        assert clients.backend.health.incidents == {}
        # Writes go on, under the new key, at the next version; old versions still serve.
        revision = await clients.admin.put_secret(SECRETS[0], "after the rotation")
        assert revision > int(values[SECRETS[0]][0])
        assert (await head(nc, LIVE)) == marker + 1
        await serves(clients, reader, {k: v for k, v in values.items() if k != SECRETS[0]})
        latest = await clients.get(reader, SECRETS[0])
        assert (latest.version, latest.string_secret) == (str(revision), "after the rotation")
        assert await only_under(nc, new, keys.encryption) == len(values) * 2 + 2


async def test_fenced_writes_are_refused_in_one_line_and_a_killed_swap_is_no_incident(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old, reader = keys.encryption, Identity()
    async with backend_on(url, keys, next_encryption_key=new) as clients, client(url) as nc:
        values = await store(clients, reader)
        fenced = await rotate_cli(url, old, new, "--online", crash_at="fenced")
        assert fenced.returncode == 1, fenced.stderr
        await caught_up(clients, nc)
        with pytest.raises(RotationInProgress):
            await clients.admin.put_secret(SECRETS[0], "refused")
        with pytest.raises(RotationInProgress):
            await clients.admin.delete(SECRETS[1])
        with pytest.raises(RotationInProgress):
            await clients.admin.add_mapping(reader.entity_key, ["k-0"])
        assert "error: a key rotation is in progress" in await anyio.to_thread.run_sync(
            put_line, url, keys
        )
        await serves(clients, reader, values)
        # Killed after the live stream was deleted, recreated and refilled (all but the
        # marker): the backend still serves its own state, and sees nothing wrong.
        filled = await rotate_cli(url, old, new, "--online", crash_at="filled")
        assert filled.returncode == 1, filled.stderr
        await serves(clients, reader, values)
        with pytest.raises(RotationInProgress):
            await clients.admin.put_secret(SECRETS[0], "still refused")
        assert clients.backend.health.incidents == {}
        assert keys_of(clients.backend) == (old.public_key, new.public_key)
        done = await rotate_cli(url, old, new, "--online")
        assert done.returncode == 0, done.stderr
        await caught_up(clients, nc)
        assert keys_of(clients.backend) == (new.public_key, None)
        assert clients.backend.health.incidents == {}
        await serves(clients, reader, values)
        revision = await clients.admin.put_secret(SECRETS[0], "written after")
        assert (await clients.get(reader, SECRETS[0])).version == str(revision)


async def test_a_lifted_fence_lets_writes_go_on_under_the_old_key(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys, next_encryption_key=new) as clients, client(url) as nc:
        values = await store(clients, reader)
        fenced = await rotate_cli(url, keys.encryption, new, "--online", crash_at="fenced")
        assert fenced.returncode == 1, fenced.stderr
        await caught_up(clients, nc)
        with pytest.raises(RotationInProgress):
            await clients.admin.put_secret(SECRETS[0], "refused")
        aborted = await rotate_cli(url, keys.encryption, new, "--online", "--abort")
        assert aborted.returncode == 0, aborted.stderr
        await caught_up(clients, nc)
        revision = await clients.admin.put_secret(SECRETS[0], "after the abort")
        assert (await clients.get(reader, SECRETS[0])).version == str(revision)
        assert keys_of(clients.backend) == (keys.encryption.public_key, new.public_key)
        assert clients.backend.health.incidents == {}
        await serves(clients, reader, {k: v for k, v in values.items() if k != SECRETS[0]})


async def test_a_fence_for_a_key_the_backend_lacks_is_one_incident(nats_server: NatsServer) -> None:
    url, keys, stranger = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys) as clients, client(url) as nc:
        values = await store(clients, reader)
        log = EventLog(nc, backend_name=NAMES.name, barrier=Barrier(keys.encryption))
        seq, link = await log.tail()
        fence = WritesFenced(new_key=stranger.public_key, rotation="r-test", at=time.time())
        await log.append(fence, expected_last_seq=seq, previous=link)
        for _ in range(2):  # more entries while fenced: still one incident
            seq, link = await log.tail()
            await log.append(fence, expected_last_seq=seq, previous=link)
        await caught_up(clients, nc)
        incident = clients.backend.health.incidents[ROTATION_KEY_UNKNOWN]
        assert stranger.public_key in incident.detail
        assert incident.count == 1 + 2  # one incident, counted per fence it saw
        assert list(clients.backend.health.incidents) == [ROTATION_KEY_UNKNOWN]
        with pytest.raises(RotationInProgress):
            await clients.admin.put_secret(SECRETS[0], "refused")
        await serves(clients, reader, values)
        seq, link = await log.tail()
        lifted = FenceLifted(rotation="r-test", reason="test", at=time.time())
        await log.append(lifted, expected_last_seq=seq, previous=link)
        await caught_up(clients, nc)
        assert clients.backend.health.incidents == {}
        revision = await clients.admin.put_secret(SECRETS[0], "after the lift")
        assert (await clients.get(reader, SECRETS[0])).version == str(revision)


async def test_restarts_adopt_the_new_key_or_refuse_with_only_the_old_one(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys) as clients:
        values = await store(clients, reader)
    proc = await rotate_cli(url, keys.encryption, new, "--online")  # none answering
    assert proc.returncode == 0, proc.stderr
    async with client(url) as nc:  # junk after the rotation must not hide the log's key
        for i in range(70):
            subject = f"{subject_prefix(NAMES.name)}.secret.junk"
            await nc.jetstream().publish(subject, b"junk %d" % i, stream=LIVE)
    async with backend_on(url, keys, next_encryption_key=new) as clients:
        assert keys_of(clients.backend) == (new.public_key, None)
        await serves(clients, reader, values)
        revision = await clients.admin.put_secret(SECRETS[0], "under the adopted key")
        assert (await clients.get(reader, SECRETS[0])).version == str(revision)
    refused = await anyio.to_thread.run_sync(
        lambda: run_cli("run", "--nats-address", url, env=cli_env(keys), timeout=60)
    )
    # Log lines may come first; the refusal itself is one line, the last, no traceback.
    stderr = refused.stderr.decode()
    assert refused.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("secrets-nats-kv: ")]
    assert errors == [stderr.splitlines()[-1]], stderr
    assert "error: " in errors[0]
    assert "ENCRYPTION_XKEY_SEED" in errors[0]
    async with backend_on(url, Keys(transit=keys.transit, encryption=new)) as clients:
        await serves(clients, reader, {k: v for k, v in values.items() if k != SECRETS[0]})


class _Waiting(logging.Handler):
    """Sets `seen` when the backend logs that it waits for a swap to finish."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for it to finish" in record.getMessage():
            self.seen.set()


@pytest.fixture
def waiting() -> Iterator[_Waiting]:
    handler = _Waiting()
    logger = logging.getLogger("actors.keyswitch")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_backend_started_during_a_swap_waits_for_it(
    nats_server: NatsServer, waiting: _Waiting
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys) as clients:
        values = await store(clients, reader)
    filled = await rotate_cli(url, keys.encryption, new, "--online", crash_at="filled")
    assert filled.returncode == 1, filled.stderr
    # Without the new key there is nothing to wait for: the half-filled log is refused
    # (not under this key, or not the log the anchor holds), at once.
    refused = False
    try:
        async with backend_on(url, keys):
            pytest.fail("a backend started on a half-filled log it cannot read")
    except* StorageError:
        refused = True
    assert refused
    assert not waiting.seen.is_set()
    backend = Backend(backend_config(url, keys, next_encryption_key=new))
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run)
        with anyio.fail_after(20):
            await waiting.seen.wait()
        assert not backend.ready.is_set()  # never ready on a half-filled log
        done = await rotate_cli(url, keys.encryption, new, "--online")
        assert done.returncode == 0, done.stderr
        with anyio.fail_after(30):
            await backend.ready.wait()
        assert keys_of(backend) == (new.public_key, None)
        backend.stop()
    async with backend_on(url, Keys(transit=keys.transit, encryption=new)) as clients:
        await serves(clients, reader, values)


# --- the options ----------------------------------------------------------------------------


async def test_run_holds_the_next_key_from_a_file_and_status_shows_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    keys, following = remembered_keys(), new_key()
    seed_file = tmp_path / "next-encryption.seed"
    seed_file.write_text(following.seed + "\n")
    seed_file.chmod(0o600)
    exempt(seed_file)  # the seed is in it on purpose
    run = spawn_run(
        nats_server.url, cli_env(keys), "--next-encryption-xkey-seed-file", str(seed_file),
        log=tmp_path / "run.log",
    )  # fmt: skip
    try:
        await wait_until_answering(nats_server.url)
        shown = await anyio.to_thread.run_sync(
            lambda: run_cli("status", "--nats-address", nats_server.url, env=cli_env(None))
        )
        out = shown.stdout.decode()
        assert shown.returncode == 0, shown.stderr
        assert (
            f"encryption {keys.encryption.public_key}\tnext encryption {following.public_key}\t"
            in out
        )
        assert following.seed not in out + shown.stderr.decode()
    finally:
        run.terminate()
        run.wait(timeout=30)
    assert following.seed not in (tmp_path / "run.log").read_text()


def test_run_refuses_a_next_key_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    keys = Keys()
    empty = tmp_path / "empty.seed"
    empty.write_text("\n")
    good = tmp_path / "good.seed"
    good.write_text(XKey.generate().seed)
    env, flag = "NEXT_ENCRYPTION_XKEY_SEED", "--next-encryption-xkey-seed-file"
    cases: dict[str, tuple[tuple[str, ...], dict[str, str], str]] = {
        "not a seed": ((), {env: "SXnot-a-seed"}, env),
        "the current key": ((), {env: keys.encryption.seed}, "current"),
        "an empty file": ((flag, str(empty)), {}, str(empty)),
        "a missing file": ((flag, str(tmp_path / "no")), {}, "cannot read"),
        "both": ((flag, str(good)), {env: XKey.generate().seed}, "not both"),
    }
    for why, (flags, given, named) in cases.items():
        done = run_cli("run", "--nats-address", "127.0.0.1:1", *flags, env=cli_env(keys, **given))
        line = one_line_error(done, named)
        assert "error:" in line, why
        for seed in (keys.encryption.seed, *given.values()):
            assert seed not in line, why  # never echo a seed, even a broken one


async def test_a_backend_started_after_the_swap_but_before_the_cleanup_serves_at_once(
    nats_server: NatsServer, waiting: _Waiting
) -> None:
    """Killed just before dropping staging: the log is whole under the new key (its views
    rebuilt, the anchor on its marker), so a start need not wait for a re-run."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys) as clients:
        values = await store(clients, reader)
    killed = await rotate_cli(url, keys.encryption, new, "--online", crash_at="cleanup")
    assert killed.returncode == 1, killed.stderr
    async with backend_on(url, keys, next_encryption_key=new) as clients:
        assert keys_of(clients.backend) == (new.public_key, None)
        await serves(clients, reader, values)
    assert not waiting.seen.is_set()


async def test_a_rotation_killed_while_rebuilding_the_views_leaves_the_switched_backend_serving(
    nats_server: NatsServer,
) -> None:
    """The fence ends at the marker; the views are rebuilt after it. Killed mid-rebuild,
    the backend has switched and serves, with no incident; a re-run finishes the views."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys, next_encryption_key=new) as clients, client(url) as nc:
        values = await store(clients, reader)
        killed = await rotate_cli(url, keys.encryption, new, "--online", crash_at="rebuild:2")
        assert killed.returncode == 1, killed.stderr
        await caught_up(clients, nc)
        assert keys_of(clients.backend) == (new.public_key, None)
        await serves(clients, reader, values)
        assert clients.backend.health.incidents == {}
        done = await rotate_cli(url, keys.encryption, new, "--online")
        assert done.returncode == 0, done.stderr
        revision = await clients.admin.put_secret(SECRETS[0], "after the re-run")
        assert (await clients.get(reader, SECRETS[0])).version == str(revision)
        assert clients.backend.health.incidents == {}
        assert await only_under(nc, new, keys.encryption) == len(values) * 2 + 2


class _Rechecking(logging.Handler):
    """Sets `seen` when the backend defers its bucket check to the end of a swap."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "checking them once it is done" in record.getMessage():
            self.seen.set()


@pytest.fixture
def rechecking() -> Iterator[_Rechecking]:
    handler = _Rechecking()
    logger = logging.getLogger("actors.backend")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_backend_started_before_the_rotation_rebuilt_the_views_waits_for_the_rebuild(
    nats_server: NatsServer, rechecking: _Rechecking
) -> None:
    """The log is whole under the new key (the anchor on its marker), so a start need not
    wait for it; but until the rotation has rebuilt the views they may hold what the old
    key wrote. A start that finds such an entry waits for the swap's end and checks the
    rebuilt views (the entry is gone); the same entry with no swap under way refuses."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    async with backend_on(url, keys) as clients:
        values = await store(clients, reader)
    bucket = NAMES.secrets_bucket
    async with client(url) as nc:
        subject = f"$KV.{bucket}.{SECRETS[-1]}"
        old_entry = await nc.jetstream().get_last_msg(kv_stream(bucket), subject)
        killed = await rotate_cli(url, keys.encryption, new, "--online", crash_at="cleanup")
        assert killed.returncode == 1, killed.stderr
        # What a bucket not rebuilt yet holds: a value sealed under the old key.
        await write_behind_the_log(nc, bucket, SECRETS[-1], old_entry.data or b"")
        backend = Backend(backend_config(url, keys, next_encryption_key=new))
        async with anyio.create_task_group() as tg:
            tg.start_soon(backend.run)
            with anyio.fail_after(20):
                await rechecking.seen.wait()
            assert not backend.ready.is_set()  # never ready on views the log does not explain
            done = await rotate_cli(url, keys.encryption, new, "--online")
            assert done.returncode == 0, done.stderr
            with anyio.fail_after(30):
                await backend.ready.wait()
            assert keys_of(backend) == (new.public_key, None)
            backend.stop()
        new_keys = Keys(transit=keys.transit, encryption=new)
        async with backend_on(url, new_keys) as clients:
            await serves(clients, reader, values)
        # No swap under way: the same write the log does not explain refuses the start.
        await write_behind_the_log(nc, bucket, SECRETS[-1], old_entry.data or b"")
        refused = False
        try:
            async with backend_on(url, new_keys):
                pytest.fail("a backend started on a bucket the log does not explain")
        except* UnexplainedEntries:
            refused = True
        assert refused
