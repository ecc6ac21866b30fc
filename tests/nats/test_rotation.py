"""`rotate-key` against real nats-servers and real backends.

Every check reads secrets back the way a wasmCloud host does (`get` on a backend started
with the key under test), compares every version number and byte, and scans every sealed
blob in the event stream and the KV bucket for the old key. Crashes are injected with the
rotation's crash points (`support/crash.py` hands the CLI a hook that exits with
`os._exit(1)` at an exact point), at random positions inside each phase, on the real CLI
process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from actors.rotation import STATE_KEY, RotationRefused, rotate_key, staging_stream_name
from events.chain import WrongKey
from events.log import EventLog, stream_name, subject_prefix
from events.types import (
    KeyRotated,
    MappingAdded,
    SecretPut,
    UndecodableEvent,
    decode_event,
    encode_event,
)
from projections.audit import AuditRecord, audit_records
from projections.kv import KvLayout
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import DecryptionError, SecretNotFound, Unauthorized
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.reader import read_stream, read_stream_ordered
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.xkeys import SealBox, XKey
from support.crash import program as crash_program
from support.harness import CLI, Clients, Identity, Keys, cli_env, run_cli, running_backend
from support.leakcheck import remember, remembered

if TYPE_CHECKING:
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
LAYOUT = KvLayout(secrets_bucket=NAMES.secrets_bucket, state_bucket=NAMES.state_bucket)
SECRETS = [f"app-{i:02d}" for i in range(30)]


# --- what the backend holds, and reading all of it back -----------------------------------


def new_key() -> XKey:
    """A fresh encryption key whose seed the end-of-run leak check looks for on disk."""
    key = XKey.generate()
    remember(key.seed, "encryption seed")
    return key


def remembered_keys() -> Keys:
    keys = Keys(encryption=new_key())
    remember(keys.transit.seed, "transit seed")
    return keys


@dataclass
class Model:
    """Every version the backend must serve, and every one it must refuse."""

    values: dict[str, dict[int, tuple[str, bytes]]] = field(default_factory=dict)
    gone: set[tuple[str, int]] = field(default_factory=set)  # destroyed versions
    deleted: set[str] = field(default_factory=set)
    reader: Identity = field(default_factory=Identity)  # mapped to every secret
    narrow: Identity = field(default_factory=Identity.provider)  # mapped to a few
    narrow_secrets: set[str] = field(default_factory=set)
    forger: Identity = field(default_factory=Identity)  # mapped only by a forged event
    mappings: dict[str, list[str]] = field(default_factory=dict)

    def put(self, name: str, revision: int, value: str | bytes) -> None:
        kind = "string" if isinstance(value, str) else "binary"
        raw = value.encode() if isinstance(value, str) else value
        remember(raw, "secret value")
        self.values.setdefault(name, {})[revision] = (kind, raw)
        self.deleted.discard(name)

    def readable(self, name: str) -> list[int]:
        return [r for r in sorted(self.values[name]) if (name, r) not in self.gone]


def value_for(i: int, round_: int) -> str | bytes:
    if i % 4 == 0:  # binary, not UTF-8
        return bytes([0xFF, 0x00, i, round_]) + os.urandom(16)
    return f"secret {i} round {round_} ✓ {os.urandom(4).hex()}"


async def populate(clients: Clients, nc: NATS) -> Model:
    """30 secrets, 2-4 versions each, deletes, undeletes, destroys, mappings, a forgery."""
    model = Model()
    admin = clients.admin
    for round_ in range(4):
        for i, name in enumerate(SECRETS):
            if round_ < 2 + i % 3:
                value = value_for(i, round_)
                model.put(name, await admin.put_secret(name, value), value)
    for name in ("app-03", "app-07", "app-11", "app-05", "app-09"):
        await admin.delete(name)
        model.deleted.add(name)
    for name in ("app-05", "app-09"):
        revision = await admin.undelete(name)
        model.values[name][revision] = model.values[name][model.readable(name)[-1]]
        model.deleted.discard(name)
    first = sorted(model.values["app-02"])[0]
    for revision in await admin.destroy("app-02", version=first):
        model.gone.add(("app-02", revision))
    for revision in await admin.destroy("app-29", all=True):
        model.gone.add(("app-29", revision))
    await admin.add_mapping(model.reader.entity_key, SECRETS)
    model.narrow_secrets = {"app-00", "app-01", "app-04"}
    await admin.add_mapping(model.narrow.entity_key, [*sorted(model.narrow_secrets), "app-08"])
    await admin.remove_mapping(model.narrow.entity_key, ["app-08"])
    # A forged mapping (not tagged for the key): the fold rejects it, before and after.
    forged = MappingAdded(at=0.0, entity=model.forger.entity_key, secrets=("app-00",))
    await nc.jetstream().publish(
        f"{subject_prefix(NAMES.name)}.mapping.{model.forger.entity_key}",
        encode_event(forged),
        stream=stream_name(NAMES.name),
    )
    model.mappings = await admin.mappings()
    return model


async def serves_everything(url: str, encryption: XKey, model: Model) -> None:
    """A backend with `encryption` serves every version with its number and bytes."""
    keys = Keys(encryption=encryption)
    async with running_backend(url, keys) as clients:
        for name in SECRETS:
            for revision in sorted(model.values[name]):
                what = f"{name} v{revision}"
                if name in model.deleted or (name, revision) in model.gone:
                    with pytest.raises(SecretNotFound):
                        await clients.get(model.reader, name, version=str(revision))
                    continue
                secret = await clients.get(model.reader, name, version=str(revision))
                kind, raw = model.values[name][revision]
                assert secret.version == str(revision), what
                assert secret.value_bytes() == raw, what
                assert (secret.binary_secret is not None) == (kind == "binary"), what
            readable = model.readable(name)
            if name in model.deleted or not readable:
                with pytest.raises(SecretNotFound):
                    await clients.get(model.reader, name)
            else:
                assert (await clients.get(model.reader, name)).version == str(readable[-1])
        for name in ("app-00", "app-08", "app-10"):
            if name in model.narrow_secrets:
                assert await clients.get(model.narrow, name)
            else:
                with pytest.raises(Unauthorized):
                    await clients.get(model.narrow, name)
        with pytest.raises(Unauthorized):
            await clients.get(model.forger, "app-00")
        assert await clients.admin.mappings() == model.mappings


async def refuses_to_start(url: str, encryption: XKey) -> None:
    """With a key that is not the log's, no event authenticates: the backend refuses to start
    (it would otherwise answer `Unauthorized` to everything and accept writes that are lost)."""
    refused = False
    try:
        async with running_backend(url, Keys(encryption=encryption)):
            pytest.fail("a backend started with a key that does not open the log's tags")
    except* WrongKey:
        refused = True
    assert refused


# --- looking at the streams directly ------------------------------------------------------


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await connect(NatsOptions(servers=(url,)), name="rotation test", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


async def streams(nc: NATS) -> set[str]:
    return {info.config.name for info in await nc.jetstream().streams_info()}


async def head(nc: NATS, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.last_seq


async def snapshot(nc: NATS) -> dict[str, Any]:
    """Every byte and header of the log and both KV buckets, with their counters."""
    result: dict[str, Any] = {"streams": await streams(nc)}
    for stream, subjects in (
        (stream_name(NAMES.name), f"{subject_prefix(NAMES.name)}.>"),
        (kv_stream(NAMES.secrets_bucket), f"$KV.{NAMES.secrets_bucket}.>"),
        (kv_stream(NAMES.state_bucket), f"$KV.{NAMES.state_bucket}.>"),
    ):
        state = (await nc.jetstream().stream_info(stream)).state
        result[stream] = (
            (state.messages, state.first_seq, state.last_seq, state.num_deleted),
            [
                (raw.seq, raw.data, raw.headers.get("Nats-Subject"), raw.headers.get(TAG_HEADER))
                async for raw in read_stream(nc, stream, subjects)
            ],
        )
    return result


async def audit(nc: NATS, key: XKey) -> list[AuditRecord]:
    log = EventLog(nc, backend_name=NAMES.name, barrier=Barrier(key))
    return [record async for record in audit_records(log)]


def comparable(records: list[AuditRecord]) -> list[AuditRecord]:
    """An entry without an event (erased, rejected) is timed by the stream, which a copy
    cannot keep; everything else must match exactly."""
    timeless = ("erased", "rejected")
    return [msgspec.structs.replace(r, time="") if r.type in timeless else r for r in records]


async def sealed_only_with(nc: NATS, new: XKey, old_keys: list[XKey]) -> int:
    """Every event is tagged for `new` only; every sealed blob opens with `new`, none with
    an old key. Returns how many blobs were checked."""
    new_auth, new_box = Barrier(new), SealBox(new, new)
    olds = [(Barrier(k), SealBox(k, k)) for k in old_keys]
    assert staging_stream_name(NAMES.name) not in await streams(nc)
    blobs: list[bytes] = []
    last: object = None
    async for raw in read_stream(nc, stream_name(NAMES.name), f"{subject_prefix(NAMES.name)}.>"):
        tag = raw.headers.get(TAG_HEADER)
        if tag is None and not raw.data:
            continue  # the placeholder of the forged entry: rejected by every key
        assert new_auth.verify(raw.seq, raw.data, tag), raw.seq
        assert not any(auth.verify(raw.seq, raw.data, tag) for auth, _ in olds), raw.seq
        last = event = decode_event(raw.data)
        if isinstance(event, SecretPut):
            blobs.append(event.sealed)
    assert isinstance(last, KeyRotated)
    assert last.new_key == new.public_key
    kv = kv_stream(NAMES.secrets_bucket)
    async for raw in read_stream(nc, kv, f"$KV.{NAMES.secrets_bucket}.>"):
        if raw.data:
            blobs.append(raw.data)
    for blob in blobs:
        new_box.open(blob)
        for _, box in olds:
            with pytest.raises(DecryptionError):
                box.open(blob)
    return len(blobs)


async def rotate(nc: NATS, old: XKey, new: XKey, **options: Any) -> Any:
    arguments: dict[str, Any] = {"force": False, "dry_run": False, "progress": None}
    arguments.update(options)
    return await rotate_key(nc, names=NAMES, layout=LAYOUT, old=old, new=new, **arguments)


async def rotate_cli(
    url: str, old: XKey, new: XKey, *flags: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = cli_env(Keys(encryption=old), NEW_ENCRYPTION_XKEY_SEED=new.seed)
    args = ("rotate-key", "--nats-address", url, *flags)
    program = CLI if crash_at is None else crash_program(crash_at)
    return await anyio.to_thread.run_sync(
        lambda: run_cli(*args, env=env, timeout=120, program=program)
    )


def one_line(proc: subprocess.CompletedProcess[bytes], *seeds: XKey) -> str:
    """The command's single output line (stdout on success, stderr on failure)."""
    out = (proc.stdout if proc.returncode == 0 else proc.stderr).decode()
    for key in seeds:
        assert key.seed not in proc.stdout.decode() + proc.stderr.decode()
    assert out.endswith("\n"), (proc.stdout, proc.stderr)
    assert out.count("\n") == 1, (proc.stdout, proc.stderr)
    return out.strip()


async def populated(url: str, keys: Keys) -> Model:
    async with running_backend(url, keys) as clients, client(url) as nc:
        return await populate(clients, nc)


# --- the tests ----------------------------------------------------------------------------


async def test_rotation_keeps_every_version_and_nothing_opens_with_the_old_key(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    model = await populated(url, keys)
    calls: list[tuple[int, int]] = []
    async with client(url) as nc:
        before = await audit(nc, keys.encryption)
        last_seq = await head(nc, stream_name(NAMES.name))
        report = await rotate(
            nc, keys.encryption, new, progress=lambda done, total: calls.append((done, total))
        )
        after = await audit(nc, new)
        checked = await sealed_only_with(nc, new, [keys.encryption])
        again = await rotate(nc, keys.encryption, new)

    types = [record.type for record in before]
    assert report.outcome == "rotated"
    assert report.entries == last_seq + 1
    assert report.erased == types.count("erased") > 0
    assert report.rejected == types.count("rejected") == 1
    assert report.resealed == types.count("secret_put")
    assert report.events == len(before) - report.erased - report.rejected
    summary = report.summary()
    assert "\n" not in summary
    assert new.public_key in summary
    assert "re-sealed" in summary
    assert checked >= 2 * report.resealed - 2 * report.erased  # the log's and the KV's
    # History: the same records at the same positions, then the rotation.
    assert comparable(after[:-1]) == comparable(before)
    assert after[-1].type == "key_rotated"
    assert after[-1].seq == last_seq + 1
    assert (after[-1].old_key, after[-1].new_key) == (keys.encryption.public_key, new.public_key)
    # Progress: three passes (stage, copy back, rebuild), each counting up to its total.
    assert calls
    assert all(0 < done <= total for done, total in calls)
    assert calls.count((last_seq + 1, last_seq + 1)) == 3
    assert again.outcome == "already rotated"
    assert "nothing to do" in again.summary()

    await serves_everything(url, new, model)
    await refuses_to_start(url, keys.encryption)


async def test_dry_run_changes_nothing_and_predicts_the_real_run(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    model = await populated(url, keys)
    async with client(url) as nc:
        before = await snapshot(nc)
        dry = await rotate(nc, keys.encryption, new, dry_run=True)
        assert await snapshot(nc) == before
        async with running_backend(url, keys):
            noted = await rotate(nc, keys.encryption, new, dry_run=True)
        real = await rotate(nc, keys.encryption, new)
    assert dry.outcome == "dry run"
    assert "nothing changed" in dry.summary()
    assert "backend answers" in noted.summary()
    counts = (dry.entries, dry.events, dry.resealed, dry.erased, dry.rejected)
    assert counts == (real.entries, real.events, real.resealed, real.erased, real.rejected)
    await serves_everything(url, new, model)


async def test_refuses_same_key_wrong_key_and_running_backends(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    model = await populated(url, keys)
    async with client(url) as nc:
        before = await snapshot(nc)
        with pytest.raises(RotationRefused, match="same key"):
            await rotate(nc, keys.encryption, keys.encryption)
        with pytest.raises(RotationRefused, match="ENCRYPTION_XKEY_SEED"):
            await rotate(nc, new_key(), new)
        async with running_backend(url, keys):
            with pytest.raises(RotationRefused, match="--force"):
                await rotate(nc, keys.encryption, new)
            assert await snapshot(nc) == before  # nothing staged, nothing changed
            # Not even with --force: writes the backend acknowledged meanwhile would be lost.
            with pytest.raises(RotationRefused, match="does not override"):
                await rotate(nc, keys.encryption, new, force=True)
            assert await snapshot(nc) == before
        forced = await rotate(nc, keys.encryption, new, force=True)
        assert forced.outcome == "rotated"
        await sealed_only_with(nc, new, [keys.encryption])
    await serves_everything(url, new, model)


async def test_a_second_rotation_is_refused_while_one_runs(nats_server: NatsServer) -> None:
    """One rotate-key at a time: a second run that starts meanwhile changes nothing."""
    url, keys, first_key, second_key = nats_server.url, remembered_keys(), new_key(), new_key()
    model = await populated(url, keys)
    first_is_working = anyio.Event()
    refusals: list[str] = []
    async with client(url) as first_nc, client(url) as second_nc:

        async def second() -> None:
            await first_is_working.wait()
            with pytest.raises(RotationRefused, match="another rotate-key") as refused:
                await rotate(second_nc, keys.encryption, second_key)
            refusals.append(str(refused.value))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            report = await rotate(
                first_nc,
                keys.encryption,
                first_key,
                progress=lambda done, total: first_is_working.set(),
            )
        assert report.outcome == "rotated"
        assert len(refusals) == 1
        assert "\n" not in refusals[0]
        await sealed_only_with(first_nc, first_key, [keys.encryption, second_key])
        # The lock went with the run: the next rotation goes ahead.
        assert (await rotate(second_nc, first_key, second_key)).outcome == "rotated"
    await serves_everything(url, second_key, model)


async def test_cli_rotates_with_one_line_of_output(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    model = await populated(url, keys)
    async with running_backend(url, keys):
        refused = await rotate_cli(url, keys.encryption, new)
        assert refused.returncode == 1
        assert refused.stdout == b""
        assert "--force" in one_line(refused, keys.encryption, new)
    dry = await rotate_cli(url, keys.encryption, new, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert one_line(dry, keys.encryption, new).startswith("dry run, nothing changed")
    done = await rotate_cli(url, keys.encryption, new)
    assert done.returncode == 0, done.stderr
    line = one_line(done, keys.encryption, new)
    assert line.startswith(f"rotated the encryption key to {new.public_key}: ")
    for versions in model.values.values():
        for kind, raw in versions.values():
            if kind == "string":
                assert raw.decode() not in line
    async with client(url) as nc:
        await sealed_only_with(nc, new, [keys.encryption])
    await serves_everything(url, new, model)


async def test_killed_at_any_point_the_old_state_serves_or_a_rerun_finishes(
    nats_server: NatsServer,
) -> None:
    """Eight crashes at six points across both phases, each at a random position of its
    phase (the seed is in every failure message)."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    url, keys = nats_server.url, remembered_keys()
    model = await populated(url, keys)
    chain = [keys.encryption, *(new_key() for _ in range(8))]
    live, staging = stream_name(NAMES.name), staging_stream_name(NAMES.name)

    async def crash(old: XKey, new: XKey, point: str, state: str) -> tuple[int, int]:
        """Kill a run at `point`; return the heads of the live and staging streams."""
        proc = await rotate_cli(url, old, new, crash_at=point)
        assert (proc.returncode, proc.stdout) == (1, b""), (seed, point, proc.stderr)
        assert b"Traceback" not in proc.stderr, (seed, point)
        assert b"error:" not in proc.stderr, (seed, point)  # died, not failed
        async with client(url) as nc:
            info = await nc.jetstream().stream_info(staging)
            assert (info.config.metadata or {}).get(STATE_KEY) == state, (seed, point)
            return await head(nc, live), info.state.last_seq

    async def staged_marker() -> KeyRotated | None:
        """The staging stream's last entry if it is the KeyRotated marker (it may be a gap's
        filler, not yet erased, when the run died right after publishing one)."""
        async with client(url) as nc:
            last = await head(nc, staging)
            if last == 0:
                return None
            data = (await nc.jetstream().get_msg(staging, seq=last)).data or b""
        try:
            event = decode_event(data)
        except UndecodableEvent:
            return None
        return event if isinstance(event, KeyRotated) else None

    async def rerun(old: XKey, new: XKey, expect: str) -> None:
        proc = await rotate_cli(url, old, new)
        assert proc.returncode == 0, (seed, proc.stderr)
        assert one_line(proc, old, new).startswith(expect), seed
        async with client(url) as nc:
            assert staging not in await streams(nc), seed
        await serves_everything(url, new, model)

    async def positions() -> int:
        async with client(url) as nc:
            return await head(nc, live)

    k0, k1, k2, k3, k4, k5, k6, k7, k8 = chain

    # Phase 1, mid-copy: the live log is untouched and served with the old key.
    await crash(k0, k1, f"stage:{rng.randint(1, await positions())}", "staging")
    assert await staged_marker() is None, seed
    await serves_everything(url, k0, model)
    await rerun(k0, k1, "rotated")

    # Staged but not committed, then the live log moves on: the stale staging is redone.
    await crash(k1, k2, "staged", "staging")
    assert await staged_marker() is not None, seed
    async with running_backend(url, Keys(encryption=k1)) as clients:
        value = "written between two runs"
        model.put("app-01", await clients.admin.put_secret("app-01", value), value)
    await serves_everything(url, k1, model)
    await rerun(k1, k2, "rotated")

    # Staged, not committed, live log unchanged: the staging is reused as it is.
    await crash(k2, k3, "staged", "staging")
    reused = await staged_marker()
    await rerun(k2, k3, "rotated")
    async with client(url) as nc:
        final = decode_event((await nc.jetstream().get_msg(live, seq=await head(nc, live))).data)
    assert final == reused, seed

    # Committed, live log not yet touched: still complete under the old key.
    await crash(k3, k4, "commit", "committed")
    await serves_everything(url, k3, model)
    await rerun(k3, k4, "finished the rotation")

    # Committed, then a backend wrote to the old log anyway: refused, never overwritten;
    # the operator abandons the staged rotation and runs it again.
    await crash(k4, k8, "commit", "committed")
    async with running_backend(url, Keys(encryption=k4)) as clients:
        value = "written after the commit"
        model.put("app-06", await clients.admin.put_secret("app-06", value), value)
    refused = await rotate_cli(url, k4, k8)
    assert refused.returncode == 1
    assert "grew after the rotation" in one_line(refused, k4, k8)
    await serves_everything(url, k4, model)
    async with client(url) as nc:
        await nc.jetstream().delete_stream(staging)
    await rerun(k4, k8, "rotated")
    k4 = k8

    # Phase 2, mid-copy: only a re-run with the committed new key may finish it.
    live_head, staging_head = await crash(
        k4, k5, f"live:{rng.randint(1, await positions())}", "committed"
    )
    assert live_head < staging_head, seed
    wrong = await rotate_cli(url, k4, k7)
    assert wrong.returncode == 1
    assert "committed rotation" in one_line(wrong, k4, k7)
    async with client(url) as nc:
        assert staging in await streams(nc)
    await rerun(k4, k5, "finished the rotation")

    # Phase 2, mid-rebuild: resumed by an operator who already switched to the new key.
    live_head, staging_head = await crash(
        k5, k6, f"rebuild:{rng.randint(1, await positions())}", "committed"
    )
    assert live_head == staging_head, seed
    await rerun(k6, k6, "finished the rotation")

    # Phase 2, everything done but dropping the staging stream: rebuilt and cleaned up.
    await crash(k6, k7, "cleanup", "committed")
    await rerun(k6, k7, "finished the rotation")
    async with client(url) as nc:
        assert await sealed_only_with(nc, k7, [k for k in chain if k is not k7]) > 0


async def test_both_readers_see_the_same_messages_and_gaps(nats_server: NatsServer) -> None:
    """The batched direct-get reader and the ordered-consumer fallback agree."""
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="READERS", subjects=["readers.>"], allow_direct=True)
        acks = [
            await js.publish_async(f"readers.{i % 7}", f"m{i}".encode(), headers={"K": str(i)})
            for i in range(5000)
        ]
        assert [(await ack).seq for ack in acks] == list(range(1, 5001))
        for seq in (1, 2, 777, 2048, 2049, 4999, 5000):
            await js.delete_msg("READERS", seq)
        fast = [(r.seq, r.data, r.headers["K"]) async for r in read_stream(nc, "READERS", ">")]
        slow = [
            (r.seq, r.data, r.headers["K"])
            async for r in read_stream_ordered(nc, "READERS", "readers.>")
        ]
    assert fast == slow
    assert [seq for seq, _, _ in fast] == [s for s in range(3, 4999) if s not in (777, 2048, 2049)]
    assert all(data == f"m{int(k)}".encode() for _, data, k in fast)


async def test_rotation_with_a_short_kv_history(nats_server: NatsServer) -> None:
    """The bucket keeps 2 revisions per key: the rebuilt views are checked against what the
    log implies under that limit, and every version still reads back from the log."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    reader = Identity()
    values: dict[tuple[str, int], str] = {}
    async with running_backend(url, keys, max_secret_history=2) as clients:
        for round_ in range(5):
            for name in ("short-a", "short-b", "short-c"):
                value = f"{name} {round_} {os.urandom(4).hex()}"
                values[name, await clients.admin.put_secret(name, value)] = remembered(value)
        await clients.admin.delete("short-c")
        destroyed = await clients.admin.destroy("short-b", version=min(values)[1] + 1)
        await clients.admin.add_mapping(reader.entity_key, ["short-a", "short-b", "short-c"])
    async with client(url) as nc:
        layout = dataclasses.replace(LAYOUT, max_history=2)
        report = await rotate_key(
            nc,
            names=NAMES,
            layout=layout,
            old=keys.encryption,
            new=new,
            force=False,
            dry_run=False,
            progress=None,
        )
        assert report.outcome == "rotated"
        per_key: dict[str, int] = {}
        bucket = kv_stream(NAMES.secrets_bucket)
        async for raw in read_stream(nc, bucket, f"$KV.{NAMES.secrets_bucket}.>"):
            key = raw.headers["Nats-Subject"].rsplit(".", 1)[1]
            per_key[key] = per_key.get(key, 0) + 1
        assert per_key == {"short-a": 2, "short-b": 2, "short-c": 2}
    async with running_backend(url, Keys(encryption=new), max_secret_history=2) as clients:
        for (name, revision), value in values.items():
            if name == "short-c" or revision in destroyed:
                with pytest.raises(SecretNotFound):
                    await clients.get(reader, name, version=str(revision))
            else:
                secret = await clients.get(reader, name, version=str(revision))
                assert (secret.version, secret.string_secret) == (str(revision), value)
