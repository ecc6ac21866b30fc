"""Integrity on a hostile bus: attacks from a connection holding no key, and their outcome.

Each test first does what an attacker with nothing but a NATS connection can do to the
event stream (delete single events, delete the tail, replace the stream by an earlier
part of itself) and then shows that no state the attacker chose is served: a backend
refuses to start in one line, a running one stops serving and refuses writes with one
incident, and `verify` / `repair` are the operator's way out, on the record.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events.access import AccessRecord, access_stream_name, access_subject, encode_access
from events.anchor import Anchor, AnchorForged, anchor_stream_name, anchor_subject
from events.chain import ChainBroken
from events.log import EventLog, stream_name, subject_prefix
from events.types import Event, LogRepaired, MappingAdded, SecretPut
from projections.kv import KV_FOREIGN_REVISION
from projections.live import CHAIN_BROKEN
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import DecryptionError, SecretNotFound, Unauthorized, UpstreamError
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.attacks import attacker, cut_back
from support.harness import Clients, Identity, Keys, cli_env, run_cli, running_backend
from support.leakcheck import remember
from support.store import log_entries

pytestmark = pytest.mark.anyio

STREAM = stream_name("nats-kv")


async def history(clients: Clients, identity: Identity) -> int:
    """put, map, revoke, put again; the position of the revocation."""
    admin = clients.admin
    assert await admin.put_secret("db", "first") == 1
    await admin.add_mapping(identity.entity_key, ["db"])
    await admin.remove_mapping(identity.entity_key, ["db"])
    assert await admin.put_secret("db", "second") == 2
    with pytest.raises(Unauthorized):
        await clients.get(identity, "db")
    return 3


def broken_at(group: BaseExceptionGroup[BaseException]) -> int:
    found = group.subgroup(ChainBroken)
    assert found is not None
    exc = found.exceptions[0]
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ChainBroken)
    return exc.seq


async def start_refused(url: str, keys: Keys) -> int:
    """Start a backend that must refuse: the position of the break it names."""
    seqs: list[int] = []
    try:
        async with running_backend(url, keys):
            pytest.fail("a backend started on a broken event log")
    except* ChainBroken as group:
        seqs.append(broken_at(group))
    assert len(seqs) == 1
    return seqs[0]


async def test_a_deleted_revocation_is_never_served_and_repair_is_on_the_record(
    nats_server: NatsServer,
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        revoked = await history(clients, identity)
    async with attacker(url) as nc:
        assert await nc.jetstream().delete_msg(STREAM, revoked)

    # Today's restart would fold the gap as an erased put and serve the revoked entity.
    assert await start_refused(url, keys) == revoked
    env = cli_env(keys)
    verify = run_cli("verify", "--nats-address", url, env=env)
    assert verify.returncode == 1
    lines = verify.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert f"chain broken at entry #{revoked}" in lines[0]

    repair = run_cli("repair", "--reason", "revocation deleted", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    assert "repaired" in repair.stdout.decode()
    assert run_cli("verify", "--nats-address", url, env=env).returncode == 0
    # On the record: the repair says what was lost; the backend starts again.
    async with attacker(url) as nc:
        entries = await log_entries(nc, keys)
    repaired = entries[-1].event
    assert isinstance(repaired, LogRepaired)
    assert repaired.lost == (revoked,)
    assert repaired.reason == "revocation deleted"
    async with running_backend(url, keys) as clients:
        # What was lost stays lost: the operator revokes again, and it holds.
        await clients.admin.remove_mapping(identity.entity_key, ["db"])
        with pytest.raises(Unauthorized):
            await clients.get(identity, "db")
        assert await clients.admin.put_secret("db", "third") == 4


async def test_a_deleted_tail_and_a_wrong_key_each_refuse_run_in_one_line(
    nats_server: NatsServer,
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        await history(clients, identity)
        await clients.admin.remove_mapping(identity.entity_key, ["db"])
    env = cli_env(keys)
    wrong = run_cli(
        "run", "--nats-address", url, env={**env, "ENCRYPTION_XKEY_SEED": XKey.generate().seed}
    )
    assert wrong.returncode == 1
    err = wrong.stderr.decode().strip().splitlines()
    assert err[-1].startswith("secrets-nats-kv: error:")
    assert "ENCRYPTION_XKEY_SEED" in err[-1]
    assert b"backend ready" not in wrong.stderr + wrong.stdout

    async with attacker(url) as nc:
        last = (await nc.jetstream().stream_info(STREAM)).state.last_seq
        assert await nc.jetstream().delete_msg(STREAM, last)
    cut = run_cli("run", "--nats-address", url, env=env)
    assert cut.returncode == 1
    line = cut.stderr.decode().strip().splitlines()[-1]
    assert f"chain broken at entry #{last}" in line
    assert b"backend ready" not in cut.stderr + cut.stdout


async def test_rebuild_with_a_wrong_key_refuses_before_dropping_anything(
    nats_server: NatsServer,
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        await history(clients, identity)
    async with attacker(url) as nc:
        before = (await nc.jetstream().stream_info(kv_stream("WASMCLOUD_SECRETS"))).state
    env = {**cli_env(keys), "ENCRYPTION_XKEY_SEED": XKey.generate().seed}
    refused = run_cli("rebuild", "--nats-address", url, env=env)
    assert refused.returncode == 1
    assert "ENCRYPTION_XKEY_SEED" in refused.stderr.decode()
    async with attacker(url) as nc:
        after = (await nc.jetstream().stream_info(kv_stream("WASMCLOUD_SECRETS"))).state
    assert (after.messages, after.last_seq) == (before.messages, before.last_seq)
    async with running_backend(url, keys) as clients:
        with pytest.raises(Unauthorized):
            await clients.get(identity, "db")
        assert (await clients.admin.list_secrets())[0].version == 2


async def test_a_log_cut_back_under_a_running_backend_stops_it_serving_and_writing(
    nats_server: NatsServer,
) -> None:
    """Truncation: the stream deleted and its first entries published again, tags intact."""
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        admin = clients.admin
        assert await admin.put_secret("db", "first") == 1
        await admin.add_mapping(reader.entity_key, ["db"])
        assert await admin.put_secret("db", "second") == 2
        await admin.remove_mapping(reader.entity_key, ["db"])
        async with attacker(url) as nc:
            await cut_back(nc, STREAM, f"{subject_prefix('nats-kv')}.secret.db", keep=2)
        # The rolled-back log grants `reader` again: the backend serves nothing from it.
        with pytest.raises(UpstreamError, match="folded it to #4"):
            await clients.get(reader, "db")
        with pytest.raises(UpstreamError):
            await admin.put_secret("db", "third")
        incidents = clients.backend.health.snapshot()
        assert [i["kind"] for i in incidents if i["blocks_writes"]] == [CHAIN_BROKEN]
        assert sum(1 for i in incidents if i["kind"] == CHAIN_BROKEN) == 1


async def test_a_log_cut_back_is_refused_at_start_by_its_anchor_until_repaired(
    nats_server: NatsServer,
) -> None:
    """The cut from the test above, with no backend running to remember: the anchor does."""
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        admin = clients.admin
        assert await admin.put_secret("db", "first") == 1
        await admin.add_mapping(reader.entity_key, ["db"])
        await admin.remove_mapping(reader.entity_key, ["db"])
    async with attacker(url) as nc:
        await cut_back(nc, STREAM, f"{subject_prefix('nats-kv')}.secret.db", keep=2)
    assert await start_refused(url, keys) == 3
    env = cli_env(keys)
    verify = run_cli("verify", "--nats-address", url, env=env)
    assert verify.returncode == 1
    assert "its anchor is at #3" in verify.stderr.decode()
    repair = run_cli("repair", "--reason", "restored an old copy", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    async with attacker(url) as nc:
        repaired = (await log_entries(nc, keys))[-1].event
    assert isinstance(repaired, LogRepaired)
    assert repaired.anchor_seq == 3  # the rollback the operator accepted, on the record
    async with running_backend(url, keys) as clients:
        await clients.admin.remove_mapping(reader.entity_key, ["db"])
        with pytest.raises(Unauthorized):
            await clients.get(reader, "db")


async def test_an_emptied_log_under_full_views_is_refused(nats_server: NatsServer) -> None:
    """Deleting the event stream must not restart history at version 1."""
    url, keys = nats_server.url, Keys()
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("db", "first") == 1
    async with attacker(url) as nc:
        await nc.jetstream().delete_stream(STREAM)
    refused = run_cli("run", "--nats-address", url, env=cli_env(keys))
    assert refused.returncode == 1
    line = refused.stderr.decode().strip().splitlines()[-1]
    assert "is empty but the KV views hold revisions" in line
    assert b"backend ready" not in refused.stderr + refused.stdout


async def test_a_stranger_on_the_anchor_subject_is_passed_over_never_believed(
    nats_server: NatsServer,
) -> None:
    """Junk and a genuine anchor published again, on top of the anchor's history: neither
    verifies (the tag covers the sequence it was written at), so the backend reads past
    them to the newest anchor of its own, starts, serves, and its next write puts a
    genuine anchor back on top. One junk message used to refuse every start."""
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("db", "first") == 1
        assert await clients.admin.put_secret("db", "second") == 2
        await clients.admin.add_mapping(reader.entity_key, ["db"])
    anchors = anchor_stream_name("nats-kv")
    async with attacker(url) as nc:
        js = nc.jetstream()
        genuine = await js.get_last_msg(anchors, anchor_subject("nats-kv"))
        tag = {KV_TAG_HEADER: (genuine.headers or {})[KV_TAG_HEADER]}
        await js.publish(anchor_subject("nats-kv"), genuine.data or b"", headers=tag)
        await js.publish(anchor_subject("nats-kv"), b'{"seq":1,"link":"forged"}')
    async with running_backend(url, keys) as clients:
        assert (await clients.get(reader, "db")).string_secret == "second"
        assert await clients.admin.put_secret("db", "third") == 3
        assert (await clients.get(reader, "db")).string_secret == "third"
    async with attacker(url) as nc:
        head = (await nc.jetstream().stream_info(STREAM)).state.last_seq
        anchor = Anchor(nc, backend_name="nats-kv", barrier=Barrier(keys.encryption))
        newest = await anchor.read()  # strict: the message on top, and only it
    assert newest is not None
    assert newest.seq == head


async def test_a_cut_log_under_an_older_anchor_replayed_is_refused(
    nats_server: NatsServer,
) -> None:
    """What passing over strangers must not open: an attacker cuts the log back and
    publishes the anchor that matched the shorter log. It does not verify where it now
    sits, so the newest anchor of the backend's own still names the cut."""
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        admin = clients.admin
        assert await admin.put_secret("db", "first") == 1
        await admin.add_mapping(reader.entity_key, ["db"])
        await admin.remove_mapping(reader.entity_key, ["db"])
    anchors = anchor_stream_name("nats-kv")
    async with attacker(url) as nc:
        js = nc.jetstream()
        state = (await js.stream_info(anchors)).state
        older = [await js.get_msg(anchors, seq) for seq in range(state.first_seq, state.last_seq)]
        matching = [m for m in older if json.loads(m.data or b"{}").get("seq") == 2]
        assert matching  # the anchor the cut log would agree with, from the kept history
        await cut_back(nc, STREAM, f"{subject_prefix('nats-kv')}.secret.db", keep=2)
        replayed = matching[-1]
        tag = {KV_TAG_HEADER: (replayed.headers or {})[KV_TAG_HEADER]}
        await js.publish(anchor_subject("nats-kv"), replayed.data or b"", headers=tag)
    assert await start_refused(url, keys) == 3


async def test_an_anchor_stream_with_no_anchor_of_ours_refuses_the_start(
    nats_server: NatsServer,
) -> None:
    """Passing over strangers is bounded below: when no kept anchor verifies (a wrong
    key, or every genuine anchor pushed out), the start is refused as before."""
    url, keys = nats_server.url, Keys()
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("db", "first") == 1
    async with attacker(url) as nc:
        js = nc.jetstream()
        anchors = anchor_stream_name("nats-kv")
        config = (await js.stream_info(anchors)).config
        config.max_msgs_per_subject = 1  # the attacker's flood, pushing the history out
        await js.update_stream(config)
        await js.publish(anchor_subject("nats-kv"), b'{"seq":0,"link":"forged"}')
    try:
        async with running_backend(url, keys):
            pytest.fail("a backend started with no anchor of its own")
    except* AnchorForged:
        pass


# --- bound admin requests and request ids ---------------------------------------------------


@contextlib.asynccontextmanager
async def capture(nc: NATS, subject: str, expect: int = 1) -> AsyncIterator[list[Msg]]:
    """Copies of every request on `subject`, as any subscriber on an open bus gets them;
    the block's end waits for `expect` of them (nats-py hands each to the callback in a
    task of its own, so a flush alone does not mean the callback has run)."""
    seen: list[Msg] = []
    arrived = anyio.Event()

    async def keep(msg: Msg) -> None:
        seen.append(msg)
        if len(seen) >= expect:
            arrived.set()

    sub = await nc.subscribe(subject, cb=keep)
    await nc.flush()
    try:
        yield seen
        with anyio.fail_after(10):
            await arrived.wait()
    finally:
        await sub.unsubscribe()


async def replay(nc: NATS, subject: str, msg: Msg) -> bytes:
    reply = await nc.request(subject, msg.data, headers=dict(msg.headers or {}), timeout=10)
    return reply.data


async def test_a_revocation_re_aimed_as_a_grant_is_refused(nats_server: NatsServer) -> None:
    """remove_mapping.<victim>, sealed by the admin, re-published as add_mapping.<attacker>."""
    url, victim, intruder = nats_server.url, Identity(), Identity()
    async with running_backend(url) as clients, attacker(url) as nc:
        admin, names = clients.admin, clients.names
        assert await admin.put_secret("db", "first") == 1
        await admin.add_mapping(victim.entity_key, ["db"])
        async with capture(nc, names.subject("remove_mapping.*")) as seen:
            await admin.remove_mapping(victim.entity_key, ["db"])
        (revocation,) = seen
        before = (await nc.jetstream().stream_info(STREAM)).state.last_seq
        aimed = names.subject(f"add_mapping.{intruder.entity_key}")
        assert await replay(nc, aimed, revocation) == b'{"error":"Unauthorized"}'
        # ...and on another operation altogether.
        assert b"Unauthorized" in await replay(nc, names.subject("delete"), revocation)
        assert (await nc.jetstream().stream_info(STREAM)).state.last_seq == before
        for who in (victim, intruder):
            with pytest.raises(Unauthorized):
                await clients.get(who, "db")


async def test_a_destroyed_put_replayed_after_a_nats_restart_stays_destroyed(
    nats_server: NatsServer,
) -> None:
    """JetStream rebuilds its duplicate window from stored messages after a restart; the
    erased put is not among them. The log's own record of request ids still is."""
    url, keys, reader = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients, attacker(url) as nc:
        admin = clients.admin
        async with capture(nc, clients.names.subject("put_secret")) as seen:
            assert await admin.put_secret("db", "compromised") == 1
        (put,) = seen
        await admin.add_mapping(reader.entity_key, ["db"])
        assert await admin.destroy("db", all=True) == [1]
    nats_server.restart()
    async with (
        running_backend(url, keys) as first,
        running_backend(url, keys) as second,
        attacker(url) as nc,
    ):
        head = (await nc.jetstream().stream_info(STREAM)).state.last_seq
        subject = first.names.subject("put_secret")
        for _ in range(4):  # the queue group spreads them over both instances
            assert await replay(nc, subject, put) == b'{"revision":1,"error":null}'
        assert (await nc.jetstream().stream_info(STREAM)).state.last_seq == head
        for clients in (first, second):
            with pytest.raises(SecretNotFound):
                await clients.get(reader, "db")


# --- the CLI's transit key ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def impostor(url: str) -> AsyncIterator[tuple[XKey, list[Msg], list[Msg]]]:
    """Answers `server_xkey` with its own key and `put_secret` with a fake success, keeping
    what it is sent: someone on an open bus answering before the backend."""
    own, asked, puts = XKey.generate(), [], []
    names = BackendNames()

    async def answer_xkey(msg: Msg) -> None:
        asked.append(msg)
        await msg.respond(own.public_key.encode())

    async def answer_put(msg: Msg) -> None:
        puts.append(msg)
        await msg.respond(b'{"revision":1,"error":null}')

    async with attacker(url) as nc:
        await nc.subscribe(names.subject("server_xkey"), cb=answer_xkey)
        await nc.subscribe(names.subject("put_secret"), cb=answer_put)
        await nc.flush()
        yield own, asked, puts


def opens(own: XKey, msg: Msg) -> bool:
    try:
        own.open(msg.data, XKey.from_public((msg.headers or {})[HOST_XKEY_HEADER]))
    except DecryptionError:
        return False
    return True


async def cli_put(url: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[bytes]:
    args = ("put", "db", "--string", "hunter2-pinned", "--nats-address", url, *extra)
    return await anyio.to_thread.run_sync(lambda: run_cli(*args, env=env))


async def test_the_cli_never_seals_to_whoever_answers_when_it_knows_the_key(
    nats_server: NatsServer,
) -> None:
    url, keys, admin = nats_server.url, Keys(), XKey.generate()
    remember("hunter2-pinned", "pinned put value")
    base = cli_env()
    async with impostor(url) as (own, asked, puts):
        # TRANSIT_XKEY_SEED: the key is known; the bus is not even asked.
        pinned = await cli_put(url, {**base, "TRANSIT_XKEY_SEED": keys.transit.seed})
        assert pinned.returncode == 0, pinned.stderr
        assert not asked
        assert not opens(own, puts[-1])
        # ADMIN_XKEY_SEED and TRANSIT_XKEY: the differing answer is refused, nothing sent.
        env = {**base, "ADMIN_XKEY_SEED": admin.seed}
        refused = await cli_put(url, {**env, "TRANSIT_XKEY": keys.transit.public_key})
        assert refused.returncode == 1
        (line,) = refused.stderr.decode().strip().splitlines()
        assert "not the pinned transit key" in line
        assert len(puts) == 1
        flag = await cli_put(url, env, "--transit-xkey", keys.transit.public_key)
        assert flag.returncode == 1
        assert len(puts) == 1
        # Neither: the CLI says once that it trusts the bus, and this is what that costs.
        trusting = await cli_put(url, env)
        assert trusting.returncode == 0
        assert trusting.stderr.decode().count("warning: sealing to the transit key the bus") == 1
        assert opens(own, puts[-1])


# --- the KV views -------------------------------------------------------------------------------


async def test_get_refuses_a_kv_entry_the_backend_did_not_write(nats_server: NatsServer) -> None:
    url, keys = nats_server.url, Keys()
    env = cli_env(keys)
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("public", "harmless") == 1
        assert await clients.admin.put_secret("db", "real") == 2
        genuine = run_cli("get", "db", "--nats-address", url, env=env)
        assert genuine.returncode == 0
        assert genuine.stdout == b"real\n"
        async with attacker(url) as nc:
            js = nc.jetstream()
            bucket = kv_stream("WASMCLOUD_SECRETS")
            copied = await js.get_last_msg(bucket, "$KV.WASMCLOUD_SECRETS.public")
            # A sealed value the backend wrote, with its tag, copied under another key.
            kept = {KV_TAG_HEADER: (copied.headers or {})[KV_TAG_HEADER]}
            await js.publish("$KV.WASMCLOUD_SECRETS.db", copied.data or b"", headers=kept)
        forged = run_cli("get", "db", "--nats-address", url, env=env)
        assert forged.returncode == 1
        (line,) = forged.stderr.decode().strip().splitlines()
        assert "was not written by the backend" in line
        assert b"harmless" not in forged.stdout
        # The stranger took revision 3: the next put's write is an incident, not a skip (the
        # writer holds it until the bucket is repaired, so the put is not confirmed).
        with pytest.raises(UpstreamError):
            await clients.admin.put_secret("db", "next")
        kinds = [i["kind"] for i in clients.backend.health.snapshot()]
        assert kinds == [KV_FOREIGN_REVISION]
        with pytest.raises(UpstreamError):  # writes refused until an operator acts
            await clients.admin.put_secret("db", "after")


# --- signed audit checkpoints -------------------------------------------------------------------


async def test_an_exported_audit_is_verified_offline_and_tampering_is_named(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        await history(clients, identity)
    signer = SigningKey.generate(Role.ACCOUNT)
    env = {**cli_env(keys), "AUDIT_SIGNING_SEED": signer.seed}
    out = tmp_path / "audit.jsonl"
    exported = run_cli("audit", "export", "--output", str(out), "--nats-address", url, env=env)
    assert exported.returncode == 0, exported.stderr
    key = signer.public_key

    def check(path: Path) -> subprocess.CompletedProcess[bytes]:
        return run_cli("audit", "verify", str(path), "--public-key", key, env=cli_env())

    good = check(out)
    assert good.returncode == 0, good.stderr
    assert good.stdout.decode().startswith("audit export verified: 4 records, 5 signed")
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 9  # a checkpoint after each of the 4 records, and a final one
    cases = {
        "edited": [*lines[:4], lines[4].replace(b"mapping_removed", b"mapping_added"), *lines[5:]],
        "removed": [*lines[:4], *lines[6:]],
        "reordered": [*lines[:4], lines[6], lines[5], lines[4], *lines[7:]],
    }
    for how, changed in cases.items():
        path = tmp_path / f"{how}.jsonl"
        path.write_bytes(b"".join(changed))
        refused = check(path)
        assert refused.returncode == 1, how
        (line,) = refused.stderr.decode().strip().splitlines()
        assert "record 3" in line, (how, line)
        assert "verified up to checkpoint 2" in line, (how, line)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:6]))
    (line,) = check(cut).stderr.decode().strip().splitlines()
    assert "cut short; verified up to checkpoint 3 (3 records)" in line
    appended = tmp_path / "appended.jsonl"
    appended.write_bytes(b"".join([*lines, lines[0]]))
    (line,) = check(appended).stderr.decode().strip().splitlines()
    assert "record 5 follows the final checkpoint" in line


async def test_forged_access_records_are_left_out_and_the_stream_denies_purge(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    access = access_stream_name("nats-kv")
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("db", "v") == 1
        with pytest.raises(Unauthorized):
            await clients.get(identity, "db")  # one genuine record: refused
        async with attacker(url) as nc:
            js = nc.jetstream()
            deadline = anyio.current_time() + 10
            while (await js.stream_info(access)).state.messages < 1:  # batched, async
                assert anyio.current_time() < deadline
                await anyio.sleep(0.05)
            genuine = await js.get_msg(access, 1)
            forged = AccessRecord(at=1.0, secret="db", entity="M" + "B" * 55, granted=True)
            await js.publish(access_subject("nats-kv"), encode_access([forged]))
            # The genuine batch again, its tag kept, under a new id and under none.
            tag = {KV_TAG_HEADER: (genuine.headers or {})[KV_TAG_HEADER]}
            await js.publish(access_subject("nats-kv"), genuine.data or b"", headers=tag)
            with pytest.raises(nats.js.errors.APIError):
                await js.purge_stream(access)
    out = tmp_path / "audit.jsonl"
    exported = run_cli(
        "audit",
        "export",
        "--access",
        "--output",
        str(out),
        "--nats-address",
        url,
        env=cli_env(keys),
    )
    assert exported.returncode == 0, exported.stderr
    assert "2 access-log messages not tagged by the backend were left out" in (
        exported.stderr.decode()
    )
    gets = [json.loads(line) for line in out.read_bytes().splitlines() if b'"get"' in line]
    assert [(g["secret"], g["granted"]) for g in gets] == [("db", False)]


async def test_a_batch_appended_through_the_codec_extends_the_chain(
    nats_server: NatsServer,
) -> None:
    """`EventLog.append_batch` (pipelined, positioned: what `import` uses) chains like the
    decider's appends: a backend started afterwards verifies and serves it."""
    url, keys, identity = nats_server.url, Keys(), Identity()
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("db", "first") == 1
    async with attacker(url) as nc:
        log = EventLog(nc, backend_name="nats-kv", barrier=Barrier(keys.encryption))
        entries = await log.read_all()
        sealed = Barrier(keys.encryption).seal(b"imported")
        batch: list[Event] = [
            SecretPut(at=1.0, name="db", sealed=sealed),
            MappingAdded(at=1.0, entity=identity.entity_key, secrets=("db",)),
        ]
        link = await log.append_batch(
            batch, expected_last_seq=entries[-1].seq, previous=entries[-1].link
        )
        assert link == (await log.read_all())[-1].link
    remember("imported", "imported value")
    async with running_backend(url, keys) as clients:
        secret = await clients.get(identity, "db")
        assert (secret.version, secret.string_secret) == ("2", "imported")
