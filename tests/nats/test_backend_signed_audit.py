"""A backend given AUDIT_SIGNING_SEED signs its chain as it goes; a later rewrite shows.

The backend signs every anchor it writes (position, chain link, encryption key), and
the anchor stream keeps them. `audit export` carries each one beside the link the log
holds there when exported, and `audit verify` checks both offline with only `A…`.
Someone who holds the encryption key but not the audit seed rewrites history in two
ways: by re-chaining the log without the revocation (and writing a fresh anchor with
the key), and by deleting the revocation and running `repair`. Either way the export
made afterwards no longer agrees with what the backend signed, and `audit verify`
names the position.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from events.anchor import Anchor, Anchored, verify_checkpoint
from events.log import EventLog, stream_name
from events.types import MappingRemoved
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.cliproc import ok, one_line_error
from support.harness import (
    Identity,
    Keys,
    cli_env,
    run_cli,
    running_backend,
    spawn_run,
    wait_until_answering,
)
from support.leakcheck import exempt, remember, remembered
from support.store import log_entries

pytestmark = pytest.mark.anyio

STREAM = stream_name("nats-kv")


def audit_key() -> SigningKey:
    signer = SigningKey.generate(Role.ACCOUNT)
    remember(signer.seed, "audit signing seed")
    return signer


async def signed_history(url: str, keys: Keys, signer: SigningKey) -> int:
    """put, grant, revoke, put: a backend that signs; the revocation's position."""
    identity = Identity()
    async with running_backend(url, keys, audit_signing_key=signer) as clients:
        admin = clients.admin
        await admin.put_secret("db", remembered("signed-first", "secret value"))
        await admin.add_mapping(identity.entity_key, ["db"])
        await admin.remove_mapping(identity.entity_key, ["db"])
        await admin.put_secret("db", remembered("signed-second", "secret value"))
    return 3


def export(url: str, keys: Keys, signer: SigningKey, out: Path) -> list[dict[str, object]]:
    env = {**cli_env(keys), "AUDIT_SIGNING_SEED": signer.seed}
    done = run_cli("audit", "export", "--output", str(out), "--nats-address", url, env=env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_bytes().splitlines()]


def verify(path: Path, signer: SigningKey) -> subprocess.CompletedProcess[bytes]:
    return run_cli("audit", "verify", str(path), "--public-key", signer.public_key, env=cli_env())


async def test_an_export_carries_the_backends_checkpoints_and_verifies(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, keys, signer = nats_server.url, Keys(), audit_key()
    await signed_history(url, keys, signer)
    lines = export(url, keys, signer, tmp_path / "audit.jsonl")
    backend = [line for line in lines if line["type"] == "backend_checkpoint"]
    assert [c["seq"] for c in backend] == [1, 2, 3, 4]  # one per write, at its head
    assert all(c["log_link"] == c["link"] for c in backend)
    assert {c["public_key"] for c in backend} == {signer.public_key}
    good = verify(tmp_path / "audit.jsonl", signer)
    assert good.returncode == 0, good.stderr
    assert "4 backend checkpoints match the log" in good.stdout.decode()

    # Another signer's export of the same log: the backend's signatures are not its.
    stranger = audit_key()
    export(url, keys, stranger, tmp_path / "stranger.jsonl")
    (line,) = verify(tmp_path / "stranger.jsonl", stranger).stderr.decode().splitlines()
    assert f"backend checkpoint at log entry #1 is not signed by {stranger.public_key}" in line


async def rechain_without(url: str, keys: Keys, dropped: int) -> None:
    """With the encryption key: the log rebuilt without entry `dropped`, chained afresh,
    and an anchor written for its new head (the key tags anchors; it cannot sign them)."""
    nc = await connect(NatsOptions(servers=(url,)), name="rewriter", persistent=False)
    try:
        barrier = Barrier(keys.encryption)
        kept = [e.event for e in await log_entries(nc, keys) if e.seq != dropped]
        await nc.jetstream().delete_stream(STREAM)
        log = EventLog(nc, backend_name="nats-kv", barrier=barrier)
        await log.ensure()
        seq, link = 0, GENESIS
        for event in kept:
            assert event is not None
            assert not isinstance(event, MappingRemoved)
            appended = await log.append(event, expected_last_seq=seq, previous=link)  # type: ignore[arg-type]
            seq, link = appended.seq, appended.link
        await Anchor(nc, backend_name="nats-kv", barrier=barrier).reset(seq, link)
    finally:
        await nc.close()


async def test_a_rechained_log_is_caught_against_an_earlier_backend_checkpoint(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, keys, signer = nats_server.url, Keys(), audit_key()
    revoked = await signed_history(url, keys, signer)
    await rechain_without(url, keys, revoked)
    rebuilt = run_cli("rebuild", "--nats-address", url, env=cli_env(keys))  # views to match
    assert rebuilt.returncode == 0, rebuilt.stderr
    async with running_backend(url, keys) as clients:  # the rewritten log is accepted...
        assert [s.name for s in await clients.admin.list_secrets()] == ["db"]
    export(url, keys, signer, tmp_path / "after.jsonl")
    refused = verify(tmp_path / "after.jsonl", signer)  # ...but not by the audit
    assert refused.returncode == 1
    (line,) = refused.stderr.decode().splitlines()
    assert "backend checkpoint at log entry #1" not in line  # the prefix is unchanged
    assert "backend checkpoint at log entry #2" not in line
    assert f"backend checkpoint at log entry #{revoked}" in line
    assert "history rewritten after it was signed" in line


async def test_a_deleted_revocation_accepted_by_repair_is_caught_by_the_audit(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, keys, signer = nats_server.url, Keys(), audit_key()
    revoked = await signed_history(url, keys, signer)
    nc = await connect(NatsOptions(servers=(url,)), name="attacker", persistent=False)
    try:
        assert await nc.jetstream().delete_msg(STREAM, revoked)
    finally:
        await nc.close()
    # Even a repair run with the audit seed: its own anchor is signed, but it cannot
    # re-sign the positions it lost.
    env = cli_env(keys, AUDIT_SIGNING_SEED=signer.seed)
    repair = run_cli("repair", "--reason", "looked fine", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    assert f"anchor signed by {signer.public_key}" in repair.stdout.decode()
    lines = export(url, keys, signer, tmp_path / "after.jsonl")
    assert [c["seq"] for c in lines if c["type"] == "backend_checkpoint"] == [1, 2, 3, 4, 5]
    refused = verify(tmp_path / "after.jsonl", signer)
    assert refused.returncode == 1
    (line,) = refused.stderr.decode().splitlines()
    assert f"backend checkpoint at log entry #{revoked}" in line


def test_run_signs_with_the_seed_from_a_file_and_never_writes_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`run` takes the audit seed from AUDIT_SIGNING_SEED_FILE (kept apart from the curve
    seeds); `audit verify` then sees its checkpoints; the seed appears in no log or store
    (the session's leak scan searches every file the test's server and backend wrote)."""
    url, keys, signer = nats_server.url, Keys(), audit_key()
    seed_file = tmp_path / "audit.seed"
    seed_file.write_text(signer.seed + "\n")
    seed_file.chmod(0o600)
    exempt(seed_file)  # the one file that is meant to hold it
    env = cli_env(keys, AUDIT_SIGNING_SEED_FILE=str(seed_file))
    proc = spawn_run(url, env, log=tmp_path / "run.log")
    try:
        anyio.run(wait_until_answering, url)
        ok(
            run_cli(
                "put",
                "filed",
                "--string",
                remembered("filed-value", "value"),
                "--nats-address",
                url,
                env=env,
            )
        )
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    lines = export(url, keys, signer, tmp_path / "audit.jsonl")
    assert [line["seq"] for line in lines if line["type"] == "backend_checkpoint"] == [1]
    good = verify(tmp_path / "audit.jsonl", signer)
    assert good.returncode == 0, good.stderr
    assert "1 backend checkpoints match the log" in good.stdout.decode()
    assert signer.seed not in (tmp_path / "run.log").read_text()

    broken = tmp_path / "broken.seed"
    broken.write_text("SAnot-a-seed\n")
    env = cli_env(Keys(), AUDIT_SIGNING_SEED_FILE=str(broken))
    refused = run_cli("run", "--nats-address", url, env=env)
    one_line_error(refused, "AUDIT_SIGNING_SEED_FILE")


async def test_checkpoints_of_the_chain_before_a_rotation_are_not_comparable(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`rotate-key` re-chains the log under the new key on purpose (its `key_rotated`
    record is in the export): the older checkpoints are counted, not failed."""
    url, keys, signer = nats_server.url, Keys(), audit_key()
    await signed_history(url, keys, signer)
    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    rotate = run_cli(
        "rotate-key",
        "--nats-address",
        url,
        env=cli_env(keys, NEW_ENCRYPTION_XKEY_SEED=new.seed),
        timeout=120,
    )
    assert rotate.returncode == 0, rotate.stderr
    # Without AUDIT_SIGNING_SEED the rotation's own anchor is unsigned, and says so.
    assert "anchor unsigned (give AUDIT_SIGNING_SEED to sign it)" in rotate.stdout.decode()
    rotated = Keys(transit=keys.transit, encryption=new)
    lines = export(url, rotated, signer, tmp_path / "rotated.jsonl")
    backend = [line for line in lines if line["type"] == "backend_checkpoint"]
    assert [c["seq"] for c in backend] == [1, 2, 3, 4]
    assert {c["key"] for c in backend} == {keys.encryption.public_key}
    good = verify(tmp_path / "rotated.jsonl", signer)
    assert good.returncode == 0, good.stderr
    assert "0 backend checkpoints match the log (4 before a key rotation, not comparable)" in (
        good.stdout.decode()
    )
    assert not verify_checkpoint("nats-kv", await newest_anchor(url, new), signer.public_key)


async def newest_anchor(url: str, key: XKey) -> Anchored:
    """The anchor as a backend reads it (tagged by `key`), and the log's head it must name."""
    nc = await connect(NatsOptions(servers=(url,)), name="anchor reader", persistent=False)
    try:
        anchored = await Anchor(nc, backend_name="nats-kv", barrier=Barrier(key)).read()
        head = (await nc.jetstream().stream_info(STREAM)).state.last_seq
    finally:
        await nc.close()
    assert anchored is not None
    assert anchored.seq == head
    return anchored


async def test_rotate_key_with_the_audit_seed_signs_its_anchor_at_the_marker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Given AUDIT_SIGNING_SEED, `rotate-key` signs the anchor it writes at the rewritten
    log's `KeyRotated`, like a backend's: the export made afterwards has a checkpoint
    under the new key that matches the log, beside the old chain's (not comparable)."""
    url, keys, signer = nats_server.url, Keys(), audit_key()
    await signed_history(url, keys, signer)
    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    env = cli_env(keys, NEW_ENCRYPTION_XKEY_SEED=new.seed, AUDIT_SIGNING_SEED=signer.seed)
    rotate = run_cli("rotate-key", "--nats-address", url, env=env, timeout=120)
    assert rotate.returncode == 0, rotate.stderr
    assert f"anchor signed by {signer.public_key}" in rotate.stdout.decode()
    assert signer.seed not in rotate.stdout.decode() + rotate.stderr.decode()
    anchored = await newest_anchor(url, new)
    assert (anchored.seq, anchored.key) == (5, new.public_key)  # the KeyRotated
    assert verify_checkpoint("nats-kv", anchored, signer.public_key)
    rotated = Keys(transit=keys.transit, encryption=new)
    lines = export(url, rotated, signer, tmp_path / "rotated.jsonl")
    backend = [line for line in lines if line["type"] == "backend_checkpoint"]
    assert [c["seq"] for c in backend] == [1, 2, 3, 4, 5]
    assert backend[-1]["key"] == backend[-1]["log_key"] == new.public_key
    assert backend[-1]["log_link"] == backend[-1]["link"]
    good = verify(tmp_path / "rotated.jsonl", signer)
    assert good.returncode == 0, good.stderr
    assert "1 backend checkpoints match the log (4 before a key rotation, not comparable)" in (
        good.stdout.decode()
    )


async def test_an_online_rotation_with_the_audit_seed_signs_its_anchor(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`rotate-key --online` beside a signing backend that holds the new key as next: the
    anchor the swap writes (before the marker that ends the fence) is signed too."""
    url, keys, signer = nats_server.url, Keys(), audit_key()
    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    env = cli_env(keys, NEW_ENCRYPTION_XKEY_SEED=new.seed, AUDIT_SIGNING_SEED=signer.seed)
    async with running_backend(
        url, keys, audit_signing_key=signer, next_encryption_key=new
    ) as clients:
        await clients.admin.put_secret("db", remembered("online-first", "secret value"))
        await clients.admin.put_secret("db", remembered("online-second", "secret value"))
        rotate = await anyio.to_thread.run_sync(
            lambda: run_cli("rotate-key", "--online", "--nats-address", url, env=env, timeout=120)
        )
        assert rotate.returncode == 0, rotate.stderr
        assert f"anchor signed by {signer.public_key}" in rotate.stdout.decode()
    anchored = await newest_anchor(url, new)
    assert anchored.key == new.public_key
    assert verify_checkpoint("nats-kv", anchored, signer.public_key)
    rotated = Keys(transit=keys.transit, encryption=new)
    export(url, rotated, signer, tmp_path / "online.jsonl")
    good = verify(tmp_path / "online.jsonl", signer)
    assert good.returncode == 0, good.stderr
    assert "1 backend checkpoints match the log (2 before a key rotation" in good.stdout.decode()


@pytest.mark.parametrize("signed", [True, False], ids=["with-seed", "without-seed"])
async def test_repair_signs_the_anchor_at_the_repaired_head(
    nats_server: NatsServer, tmp_path: Path, signed: bool
) -> None:
    """A log written by a backend without the audit seed, an entry deleted, `repair`:
    with AUDIT_SIGNING_SEED its anchor at the `LogRepaired` is a signed checkpoint that
    `audit verify` matches against the log; without, the CLI says it is unsigned and the
    export has no backend checkpoint at all."""
    url, keys, signer = nats_server.url, Keys(), audit_key()
    async with running_backend(url, keys) as clients:  # no audit seed: unsigned anchors
        await clients.admin.put_secret("db", remembered("repair-first", "secret value"))
        await clients.admin.put_secret("db", remembered("repair-second", "secret value"))
        await clients.admin.put_secret("db", remembered("repair-third", "secret value"))
    nc = await connect(NatsOptions(servers=(url,)), name="attacker", persistent=False)
    try:
        assert await nc.jetstream().delete_msg(STREAM, 2)
    finally:
        await nc.close()
    env = cli_env(keys, AUDIT_SIGNING_SEED=signer.seed) if signed else cli_env(keys)
    repair = run_cli("repair", "--reason", "lost #2", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    said = repair.stdout.decode()
    anchored = await newest_anchor(url, keys.encryption)
    assert anchored.seq == 4  # the LogRepaired
    lines = export(url, keys, signer, tmp_path / "repaired.jsonl")
    backend = [line for line in lines if line["type"] == "backend_checkpoint"]
    good = verify(tmp_path / "repaired.jsonl", signer)
    assert good.returncode == 0, good.stderr
    if signed:
        assert f"anchor signed by {signer.public_key}" in said
        assert verify_checkpoint("nats-kv", anchored, signer.public_key)
        assert [c["seq"] for c in backend] == [4]
        assert "1 backend checkpoints match the log" in good.stdout.decode()
    else:
        assert "anchor unsigned (give AUDIT_SIGNING_SEED to sign it)" in said
        assert not anchored.signature
        assert backend == []
        assert "backend checkpoints" not in good.stdout.decode()


async def test_a_bad_audit_seed_is_one_line_and_rewrites_nothing(nats_server: NatsServer) -> None:
    """`rotate-key` and `repair` read AUDIT_SIGNING_SEED before touching NATS."""
    url, keys = nats_server.url, Keys()
    async with running_backend(url, keys) as clients:
        await clients.admin.put_secret("db", remembered("bad-seed-value", "secret value"))
    before = await newest_anchor(url, keys.encryption)
    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    bad = {"AUDIT_SIGNING_SEED": "SAnot-a-seed"}
    rotate_env = cli_env(keys, NEW_ENCRYPTION_XKEY_SEED=new.seed, **bad)
    one_line_error(
        run_cli("rotate-key", "--nats-address", url, env=rotate_env), "AUDIT_SIGNING_SEED"
    )
    repair_env = cli_env(keys, **bad)
    one_line_error(
        run_cli("repair", "--reason", "x", "--nats-address", url, env=repair_env),
        "AUDIT_SIGNING_SEED",
    )
    assert await newest_anchor(url, keys.encryption) == before  # still the old key's, as it was
