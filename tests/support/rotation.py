"""The rotation tests' shared parts: a populated backend, reading it all back, the streams.

`test_rotation` (offline) and `test_online_rotation` build the same history, read every
version back through a backend started with the key under test, and scan every sealed
blob and entry tag for the old keys.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from actors.rotation import rotate_key, staging_stream_name
from events.access import access_stream_name, access_subject
from events.chain import WrongKey
from events.log import EventLog, stream_name, subject_prefix
from events.types import Event, KeyRotated, MappingAdded, SecretPut, decode_event, encode_event
from projections.audit import AuditRecord, audit_records
from projections.kv import KvLayout
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions, kv_stream
from secrets_nats_kv.errors import DecryptionError, SecretNotFound, Unauthorized
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import MSG_ID_HEADER
from secrets_nats_kv.nats.reader import read_stream
from secrets_nats_kv.xkeys import SealBox, XKey
from support.crash import program as crash_program
from support.harness import CLI, Clients, Identity, Keys, cli_env, run_cli, running_backend
from support.leakcheck import remember

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


async def sealed_only_with(
    nc: NATS, new: XKey, old_keys: list[XKey], *, written_after: bool = False
) -> int:
    """Every event is tagged for `new` only; every sealed blob opens with `new`, none with
    an old key; the log ends with the rotation to `new` (or, `written_after`: has it as
    its last rotation, backends having written after it). Returns the blobs checked."""
    new_auth, new_box = Barrier(new), SealBox(new, new)
    olds = [(Barrier(k), SealBox(k, k)) for k in old_keys]
    assert staging_stream_name(NAMES.name) not in await streams(nc)
    blobs: list[bytes] = []
    last: object = None
    rotation = KeyRotated(at=0.0, old_key="", new_key="")  # the log's last KeyRotated
    async for raw in read_stream(nc, stream_name(NAMES.name), f"{subject_prefix(NAMES.name)}.>"):
        tag = raw.headers.get(TAG_HEADER)
        if tag is None and not raw.data:
            continue  # the placeholder of the forged entry: rejected by every key
        assert new_auth.verify(raw.seq, raw.data, tag), raw.seq
        assert not any(auth.verify(raw.seq, raw.data, tag) for auth, _ in olds), raw.seq
        last = event = decode_event(raw.data)
        if isinstance(event, SecretPut):
            blobs.append(event.sealed)
        if isinstance(event, KeyRotated):
            rotation = event
    assert rotation.new_key == new.public_key
    assert written_after or last is rotation
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


async def access_only_with(nc: NATS, new: XKey, old_keys: list[XKey]) -> int:
    """Every access-log batch is tagged for `new` and for no old key; how many there are."""
    stream, subject = access_stream_name(NAMES.name), access_subject(NAMES.name)
    new_auth, olds = Barrier(new), [Barrier(k) for k in old_keys]
    checked = 0
    async for raw in read_stream(nc, stream, subject):
        batch_id, tag = raw.headers.get(MSG_ID_HEADER, ""), raw.headers.get(KV_TAG_HEADER)
        assert new_auth.verify_kv(stream, batch_id, 0, raw.data, tag), raw.seq
        assert not any(auth.verify_kv(stream, batch_id, 0, raw.data, tag) for auth in olds)
        checked += 1
    return checked


# --- writing to the live log as a backend would, without one ------------------------------


async def append_directly(url: str, key: XKey, events: list[Event]) -> list[int]:
    """Append `events` at the live head, chained and tagged for `key`, as a decider does."""
    async with client(url) as nc:
        log = EventLog(nc, backend_name=NAMES.name, barrier=Barrier(key))
        seq, link = await log.tail()
        seqs = []
        for event in events:
            appended = await log.append(event, expected_last_seq=seq, previous=link)
            seq, link = appended.seq, appended.link
            seqs.append(seq)
        return seqs


def puts(key: XKey, values: list[tuple[str, str]]) -> list[Event]:
    box = SealBox(key, key)
    return [SecretPut(at=time.time(), name=name, sealed=box.seal(v.encode())) for name, v in values]


async def put_directly(url: str, key: XKey, name: str, value: str) -> int:
    """One put appended directly (as a backend still running would); its revision."""
    remember(value.encode(), "secret value")
    await append_directly(url, key, puts(key, [(name, value)]))
    async with client(url) as nc:
        revision = (await audit(nc, key))[-1].revision
    assert revision is not None
    return revision
