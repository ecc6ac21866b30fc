"""`rotate-key --online` against real nats-servers: the copy catches up, the fence, --abort.

Writes made during the copy are injected at exact points of the run: the run's crash
points hand control to a writer that appends to the live log on its own connection (in
a thread, with the run waiting at that point), the way a backend's decider appends, so
each write lands exactly where the test wants it (mid-copy, in a catch-up pass, after
the fence). Crashes are injected on the real CLI process (`support/crash.py`) or, for
points only reached under concurrent writes, in-process (the run stops with `Crashed`).
Every check reads the secrets back through a backend started with the new key and scans
every entry tag and sealed blob for the old key (`support.rotation`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from actors.rotation import STATE_KEY, RotationRefused, staging_stream_name
from actors.rotation.lock import RotationLock
from actors.service import STATS_KEYS
from events.log import EventLog, stream_name
from events.types import (
    Event,
    FenceLifted,
    KeyRotated,
    SecretDestroyed,
    UndecodableEvent,
    WritesFenced,
    decode_event,
)
from projections.audit import AuditRecord
from secrets_nats_kv.app.status import gather
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import RotationInProgress, UpstreamError
from secrets_nats_kv.nats.reader import RawMessage, get_message
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.harness import Keys, cli_env, run_cli, running_backend
from support.leakcheck import remember
from support.rotation import (
    NAMES,
    Model,
    access_only_with,
    append_directly,
    audit,
    client,
    comparable,
    head,
    new_key,
    one_line,
    populated,
    puts,
    refuses_to_start,
    remembered_keys,
    rotate,
    rotate_cli,
    sealed_only_with,
    serves_everything,
    snapshot,
    streams,
)

if TYPE_CHECKING:
    from pathlib import Path

    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio

LIVE, STAGING = stream_name(NAMES.name), staging_stream_name(NAMES.name)


# --- writing to the live log while a run waits at one of its points -----------------------


class Crashed(BaseException):
    """An in-process run stopped at a crash point (the CLI's hard exit, in-process)."""


def in_thread(work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` on its own event loop (and its own connections), blocking this one."""
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, asyncio.run(work())))  # type: ignore[arg-type]
        except BaseException as exc:  # handed back to the run's thread below
            outcome.append((False, exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@dataclass
class At:
    """Crash points of an in-process run: at the n-th step of a point run a writer, and
    stop (raise `Crashed`) at `stop_at`."""

    writers: dict[tuple[str, int], Callable[[], Awaitable[Any]]] = field(default_factory=dict)
    stop_at: tuple[str, int] | None = None
    counts: Counter[str] = field(default_factory=Counter)

    def reached(self, point: str) -> bool:
        self.counts[point] += 1
        step = (point, self.counts[point])
        if step in self.writers:
            in_thread(self.writers[step])
        return step == self.stop_at

    def stop(self) -> None:
        raise Crashed(self.stop_at)


async def destroy_first_version(url: str, key: XKey, name: str) -> int:
    """Destroy the first version of `name` as a backend does (the event, then the erase)."""
    async with client(url) as nc:
        records = await audit(nc, key)
        put = next(r for r in records if r.type == "secret_put" and r.secret == name)
        log = EventLog(nc, backend_name=NAMES.name, barrier=Barrier(key))
        entry = await log.entry(put.seq)
        assert entry is not None
        assert put.revision is not None
        destroy = SecretDestroyed(
            at=time.time(),
            name=name,
            versions=(put.revision,),
            erased_seqs=(put.seq,),
            erased_digests=(entry.digest,),
            erased_request_ids=("",),
        )
    await append_directly(url, key, [destroy])
    async with client(url) as nc:
        await EventLog(nc, backend_name=NAMES.name, barrier=None).erase(put.seq)
    return put.revision


def late_values(names: range, label: str) -> list[tuple[str, str]]:
    values = [(f"app-{i:02d}", f"{label} {i} {os.urandom(4).hex()}") for i in names]
    for _, value in values:
        remember(value.encode(), "secret value")
    return values


def learn_puts(
    model: Model, records: list[AuditRecord], after: int, values: list[tuple[str, str]]
) -> None:
    """The revisions the log gave the puts appended after position `after`, into the model."""
    late = [r for r in records if r.type == "secret_put" and r.seq > after]
    assert [r.secret for r in late] == [name for name, _ in values]
    for record, (name, value) in zip(late, values, strict=True):
        assert record.revision is not None
        model.put(name, record.revision, value)


async def last_entry(nc: NATS, stream: str) -> tuple[RawMessage, Event | None]:
    """The last message of `stream` and its event (None: a gap's filler, mid-copy)."""
    raw = await get_message(nc, stream, await head(nc, stream))
    assert raw is not None
    try:
        return raw, decode_event(raw.data)
    except UndecodableEvent:
        return raw, None


async def staging_state(nc: NATS) -> str | None:
    if STAGING not in await streams(nc):
        return None
    info = await nc.jetstream().stream_info(STAGING)
    return (info.config.metadata or {}).get(STATE_KEY)


async def populated_at(url: str, keys: Keys) -> tuple[Model, int]:
    """The shared history, and where the live log stood after it."""
    model = await populated(url, keys)
    async with client(url) as nc:
        return model, await head(nc, LIVE)


# --- the tests ----------------------------------------------------------------------------


async def test_writes_during_the_copy_are_kept_under_the_new_key_at_their_versions(
    nats_server: NatsServer,
) -> None:
    """Puts and a destroy land mid-copy, more puts in a catch-up pass: all are kept (the
    destroyed version is gone from staging too), every position and version unchanged."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old = keys.encryption
    model, start = await populated_at(url, keys)
    early, later = late_values(range(10, 13), "mid-copy"), late_values(range(13, 17), "catch-up")
    destroyed: list[int] = []
    at_fence: list[AuditRecord] = []

    async def mid_copy() -> None:
        await append_directly(url, old, puts(old, early))
        destroyed.append(await destroy_first_version(url, old, "app-12"))

    async def in_catch_up() -> None:
        await append_directly(url, old, puts(old, later))

    async def fenced() -> None:
        async with client(url) as nc:
            at_fence.extend(await audit(nc, old))

    hook = At({("stage", 40): mid_copy, ("catchup", 1): in_catch_up, ("fenced", 1): fenced})
    async with client(url) as nc:
        report = await rotate(nc, old, new, online=True, crash=hook)
        after = await audit(nc, new)
        await sealed_only_with(nc, new, [old])
    assert report.outcome == "rotated"
    assert report.fenced_seconds is not None
    assert report.fenced_seconds >= 0
    assert hook.counts["catchup"] > 0
    assert hook.counts["fenced"] == 1
    # Every record at its position, revisions included; then the fence and the marker.
    assert comparable(after[:-1]) == comparable(at_fence)
    assert [r.type for r in after[-2:]] == ["writes_fenced", "key_rotated"]
    assert after[-1].seq == after[-2].seq + 1 == report.entries
    learn_puts(model, after, start, early + later)
    (revision,) = destroyed
    model.gone.add(("app-12", revision))
    destroy = next(r for r in after if r.type == "secret_destroyed" and r.secret == "app-12")
    assert destroy.seq > start
    await serves_everything(url, new, model)


async def test_a_run_stopped_in_a_catch_up_or_outrun_by_a_stray_writer_is_finished_by_a_rerun(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old = keys.encryption
    model, start = await populated_at(url, keys)
    first, stray = late_values(range(20, 22), "before the crash"), late_values(range(22, 23), "x")

    async def write_first() -> None:
        await append_directly(url, old, puts(old, first))

    crashing = At({("stage", 20): write_first}, stop_at=("catchup", 1))
    async with client(url) as nc:
        with pytest.raises(Crashed):
            await rotate(nc, old, new, online=True, crash=crashing)
        assert await staging_state(nc) == "staging"
        _, event = await last_entry(nc, LIVE)
        assert not isinstance(event, WritesFenced)  # stopped before the fence: writes go on

    async def write_stray() -> None:  # a writer that does not honour the fence
        await append_directly(url, old, puts(old, stray))

    outrun = At({("staged", 1): write_stray})
    async with client(url) as nc:
        with pytest.raises(RotationRefused, match="grew after the write fence") as refused:
            await rotate(nc, old, new, online=True, crash=outrun)
        assert "\n" not in str(refused.value)
        # It gave up: its fence is lifted (writes go on) and its staging dropped.
        _, lifted = await last_entry(nc, LIVE)
        assert isinstance(lifted, FenceLifted)
        assert "grew after the write fence" in lifted.reason
        assert await staging_state(nc) is None
        report = await rotate(nc, old, new, online=True)
        assert report.outcome == "rotated"
        after = await audit(nc, new)
        await sealed_only_with(nc, new, [old])
    learn_puts(model, after, start, first + stray)  # the stray write after the fence is kept too
    await serves_everything(url, new, model)


async def test_killed_at_each_online_point_a_rerun_finishes(nats_server: NatsServer) -> None:
    url, keys = nats_server.url, remembered_keys()
    model = await populated(url, keys)
    chain = [keys.encryption, *(new_key() for _ in range(8))]
    points = ["stage:25", "fenced", "staged", "commit", "live:30", "filled", "rebuild:10"]
    points.append("cleanup")
    for point, old, new in zip(points, chain, chain[1:], strict=False):
        proc = await rotate_cli(url, old, new, "--online", crash_at=point)
        assert (proc.returncode, proc.stdout) == (1, b""), (point, proc.stderr)
        assert b"Traceback" not in proc.stderr, point
        assert b"error:" not in proc.stderr, point  # died, not failed
        async with client(url) as nc:
            state = await staging_state(nc)
            raw, event = await last_entry(nc, LIVE)
            uncommitted = point in ("stage:25", "fenced", "staged")
            assert state == ("staging" if uncommitted else "committed"), point
            if point in ("fenced", "staged", "commit"):  # the fence ends the old log
                assert isinstance(event, WritesFenced)
                assert event.new_key == new.public_key
                assert Barrier(old).verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER))
            if point == "filled":  # refilled but for the marker, which comes last
                assert raw.seq == await head(nc, STAGING) - 1
        if uncommitted:  # still whole under the old key (once committed, a backend that
            await serves_everything(url, old, model)  # starts waits for the swap: keyswitch)
        done = await rotate_cli(url, old, new, "--online")
        assert done.returncode == 0, (point, done.stderr)
        line = one_line(done, old, new)
        verb = "rotated" if uncommitted else "finished"
        assert line.startswith(f"{verb} the "), (point, line)
        if point not in ("rebuild:10", "cleanup"):  # the fence ended in the first run
            assert " online: " in line, line
            assert " values re-sealed, " in line, line
            assert " values/s, writes fenced for " in line, line
        async with client(url) as nc:
            assert STAGING not in await streams(nc), point
            _, event = await last_entry(nc, LIVE)
            assert isinstance(event, KeyRotated)
            assert event.new_key == new.public_key
    final = chain[len(points)]
    async with client(url) as nc:
        assert await sealed_only_with(nc, final, [k for k in chain if k is not final]) > 0
    await serves_everything(url, final, model)


async def test_abort_lifts_the_fence_before_the_commit_and_is_refused_after(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old = keys.encryption
    model = await populated(url, keys)
    fenced = await rotate_cli(url, old, new, "--online", crash_at="fenced")
    assert fenced.returncode == 1
    async with client(url) as nc:
        fence_raw, fence = await last_entry(nc, LIVE)
        assert isinstance(fence, WritesFenced)
    fence_seq = fence_raw.seq
    async with running_backend(url, keys) as clients:
        with pytest.raises(RotationInProgress):
            await clients.admin.put_secret("app-01", "refused while fenced")
        assert await clients.get(model.reader, "app-00")  # gets are never fenced

    aborted = await rotate_cli(url, old, new, "--online", "--abort")
    assert aborted.returncode == 0, aborted.stderr
    line = one_line(aborted, old, new)
    assert line.startswith(f"aborted the rotation: lifted the write fence at entry #{fence_seq}")
    assert "dropped the uncommitted staging stream" in line
    async with client(url) as nc:
        lifted_raw, lifted = await last_entry(nc, LIVE)
        assert lifted_raw.seq == fence_seq + 1
        assert isinstance(lifted, FenceLifted)
        assert lifted.rotation == fence.rotation
        assert STAGING not in await streams(nc)
        before = await snapshot(nc)
    again = await rotate_cli(url, old, new, "--online", "--abort")
    assert one_line(again, old, new).startswith("nothing to abort")
    async with client(url) as nc:
        assert await snapshot(nc) == before  # nothing to abort changes nothing
    async with running_backend(url, keys) as clients:
        value = "written after the abort"
        model.put("app-01", await clients.admin.put_secret("app-01", value), value)

    committed = await rotate_cli(url, old, new, "--online", crash_at="commit")
    assert committed.returncode == 1
    refused = await rotate_cli(url, old, new, "--online", "--abort")
    assert refused.returncode == 1
    assert "cannot be aborted" in one_line(refused, old, new)
    async with client(url) as nc:
        assert await staging_state(nc) == "committed"
    finished = await rotate_cli(url, old, new, "--online")
    assert finished.returncode == 0, finished.stderr
    await serves_everything(url, new, model)


async def test_refuses_a_backend_without_the_new_key_naming_it(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    await populated(url, keys)
    async with running_backend(url, keys), client(url) as nc:
        before = await snapshot(nc)
        answering = await gather(nc, NAMES, 1.0)
        assert len(answering) == 1
        instance = answering[0].id
        proc = await rotate_cli(url, keys.encryption, new, "--online")
        assert proc.returncode == 1
        line = one_line(proc, keys.encryption, new)
        assert f"backend instance {instance} does not hold the new key {new.public_key}" in line
        assert "NEXT_ENCRYPTION_XKEY_SEED" in line
        assert await snapshot(nc) == before


async def test_one_rotation_at_a_time(nats_server: NatsServer) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    await populated(url, keys)
    async with client(url) as nc, client(url) as holder, RotationLock(holder, NAMES.name):
        before = await snapshot(nc)
        with pytest.raises(RotationRefused, match="another rotate-key"):
            await rotate(nc, keys.encryption, new, online=True)
        proc = await rotate_cli(url, keys.encryption, new, "--online", "--abort")
        assert "another rotate-key" in one_line(proc, keys.encryption, new)
        assert await snapshot(nc) == before


async def test_a_tail_deleted_during_the_copy_is_refused_not_laundered(
    nats_server: NatsServer,
) -> None:
    """An entry appended and then deleted (no destroy names it) while the copy runs: the
    catch-up reads a range that ends in a gap, and the run refuses on the broken chain
    before any fence, instead of waiting for it or copying the cut log into a valid one."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old = keys.encryption
    await populated(url, keys)

    cut: list[int] = []

    async def append_then_delete() -> None:
        cut.extend(await append_directly(url, old, puts(old, late_values(range(1), "cut"))))
        async with client(url) as nc:
            assert await nc.jetstream().delete_msg(LIVE, cut[0])

    async with client(url) as nc:
        with pytest.raises(RotationRefused, match="chain broken at entry") as refused:
            await rotate(nc, old, new, online=True, crash=At({("stage", 30): append_then_delete}))
        assert "\n" not in str(refused.value)
        assert f"#{cut[0]}" in str(refused.value)
        assert await staging_state(nc) is None
        assert await head(nc, LIVE) == cut[0]  # nothing after the cut: no fence was set


@dataclass
class Load:
    """Gets and puts issued back to back through a running backend, counted."""

    gets: int = 0
    failed_gets: list[str] = field(default_factory=list)
    acknowledged: list[tuple[int, str]] = field(default_factory=list)
    refused: int = 0  # puts answered RotationInProgress (not acknowledged)
    # Puts answered UpstreamError (not acknowledged; maybe stored): on a loaded machine a
    # put right after the switch can time out waiting for the KV views being rebuilt.
    unsettled: int = 0
    rotated: bool = False
    resumed: anyio.Event = field(default_factory=anyio.Event)  # a put acked after the run


async def test_online_with_a_running_backend_holding_both_keys(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Gets never fail, acknowledged puts survive at their versions, puts during the fence
    are refused (not lost), and the backend switches to the new key without a restart."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    old = keys.encryption
    model = await populated(url, keys)
    _, expected = model.values["app-01"][max(model.values["app-01"])]
    load = Load()
    async with running_backend(url, keys, next_encryption_key=new) as clients:

        async def get_loop() -> None:
            while not load.resumed.is_set():
                try:
                    secret = await clients.get(model.reader, "app-01")
                    if secret.value_bytes() != expected:
                        load.failed_gets.append("wrong value")
                except Exception as exc:  # every failure is counted, none may happen
                    load.failed_gets.append(type(exc).__name__)
                load.gets += 1

        async def put_loop() -> None:
            round_ = 0
            while not load.resumed.is_set():
                value = f"under load {round_} {os.urandom(4).hex()}"
                remember(value.encode(), "secret value")
                round_ += 1
                try:
                    revision = await clients.admin.put_secret("app-03", value)
                except RotationInProgress:
                    load.refused += 1
                    continue
                except UpstreamError:
                    load.unsettled += 1
                    continue
                load.acknowledged.append((revision, value))
                if load.rotated:
                    load.resumed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(get_loop)
            tg.start_soon(put_loop)
            done = await rotate_cli(url, old, new, "--online")
            load.rotated = True
        assert done.returncode == 0, done.stderr
        line = one_line(done, old, new)
        assert line.startswith(f"rotated the encryption key to {new.public_key} online: "), line
        status = clients.backend.status()
        public_keys = status[STATS_KEYS]
        assert isinstance(public_keys, dict)
        assert public_keys["encryption"] == new.public_key  # switched, not restarted
        # No incident from the swap (the forged mapping of the history is the one known).
        incidents = {str(i["kind"]) for i in clients.backend.health.snapshot()}
        assert incidents <= {"event-log-foreign-entries"}, incidents
    assert load.failed_gets == []
    assert load.gets > 0
    assert load.refused > 0  # the fence held writes back; none of them was acknowledged
    for revision, value in load.acknowledged:
        model.put("app-03", revision, value)
    model.deleted.discard("app-03")
    revisions = [revision for revision, _ in load.acknowledged]
    assert revisions == sorted(set(revisions))  # no version handed out twice
    async with client(url) as nc:
        await sealed_only_with(nc, new, [old], written_after=True)
        assert await access_only_with(nc, new, [old]) > 0  # the gets' records, re-tagged
    await serves_everything(url, new, model)
    await refuses_to_start(url, old)
    # The audit export under the new key still verifies (signed checkpoints, offline).
    signer = SigningKey.generate(Role.ACCOUNT)
    out = tmp_path / "audit.jsonl"
    env = {**cli_env(Keys(encryption=new)), "AUDIT_SIGNING_SEED": signer.seed}
    exported = run_cli("audit", "export", "--output", str(out), "--nats-address", url, env=env)
    assert exported.returncode == 0, exported.stderr
    verified = run_cli(
        "audit", "verify", str(out), "--public-key", signer.public_key, env=cli_env()
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.decode().startswith("audit export verified: ")
