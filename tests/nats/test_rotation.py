"""`rotate-key` against real nats-servers and real backends.

Every check reads secrets back the way a wasmCloud host does (`get` on a backend started
with the key under test), compares every version number and byte, and scans every sealed
blob in the event stream and the KV bucket for the old key. Crashes are injected with the
rotation's crash points (`support/crash.py` hands the CLI a hook that exits with
`os._exit(1)` at an exact point), at random positions inside each phase, on the real CLI
process.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import TYPE_CHECKING

import anyio
import pytest

from actors.rotation import STATE_KEY, RotationRefused, rotate_key, staging_stream_name
from events.log import stream_name
from events.types import KeyRotated, UndecodableEvent, decode_event
from secrets_nats_kv.config import kv_stream
from secrets_nats_kv.errors import SecretNotFound
from secrets_nats_kv.nats.reader import read_stream, read_stream_ordered
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, running_backend
from support.leakcheck import remembered
from support.rotation import (
    LAYOUT,
    NAMES,
    audit,
    client,
    comparable,
    head,
    new_key,
    one_line,
    populated,
    put_directly,
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
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio

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

    # Committed, live log not yet touched: still complete under the old key (a backend
    # that starts now waits for the swap to finish: actors.keyswitch).
    async with client(url) as nc:
        untouched = (await snapshot(nc))[live]
    await crash(k3, k4, "commit", "committed")
    async with client(url) as nc:
        assert (await snapshot(nc))[live] == untouched, seed
    await rerun(k3, k4, "finished the rotation")

    # Committed, then a backend still running wrote to the old log anyway: refused, never
    # overwritten; the operator abandons the staged rotation and runs it again.
    await crash(k4, k8, "commit", "committed")
    value = "written after the commit"
    model.put("app-06", await put_directly(url, k4, "app-06", value), value)
    refused = await rotate_cli(url, k4, k8)
    assert refused.returncode == 1
    assert "grew after the rotation" in one_line(refused, k4, k8)
    async with client(url) as nc:
        await nc.jetstream().delete_stream(staging)
    await serves_everything(url, k4, model)
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
