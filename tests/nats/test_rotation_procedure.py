"""The operator's online encryption-key rotation, end to end, under load (issue 15).

Two real `secrets-nats-kv run` processes serve one deployment while a wasmCloud host
does a `get` every 20 ms and an admin a `put` every 200 ms (tests/support/rotation_load.py).
The procedure is the README's three steps: roll the backends to "current + next" one at a
time; `rotate-key --online` (here killed at several of its crash points, each run
finished by the next, and a backend SIGKILLed and restarted while the rotation is in
progress); roll them to "new only". Then:

- no get failed (but one a SIGKILLed backend had taken: no process can answer it, and a
  wasmCloud host does not retry), and none returned a value never written;
- every acknowledged write is served at its version with its value, no version was
  handed out twice, and the audit history (every event, its position and version) is the
  one before the rotation, plus the writes made during it, plus the rotation's own events;
- a scan of every stream on the server (event log, anchor, access log, both KV buckets
  with their history, any staging stream) finds nothing the old key opens or tags, and
  the same scan finds the new key everywhere (so it is not blind);
- `verify`, `audit export` (signed) and `audit verify` pass;
- a backend started with only the old key refuses, in one line.

Puts refused by the rotation's write fence (`RotationInProgress`) are not acknowledged;
they are counted, with the longest pause between acknowledged writes, and printed (the
numbers are the bench's business: no timed assertion here).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import anchor_stream
from secrets_nats_kv.xkeys import XKey
from support.cliproc import PREFIX
from support.crash import program as crash_program
from support.harness import CLI, Identity, cli_env, run_cli
from support.host import HostClient
from support.leakcheck import remember
from support.rotation_load import (
    READY_LINE,
    Ack,
    Fleet,
    Kill,
    Load,
    backend_env,
    fleet,
    key_traces,
    populate,
    rotation_env,
    unserved_writes,
)

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
SECRETS = 200  # a few hundred values to re-seal; the 100 000 are bench/bench_rotation.py's

# Where the online run is stopped, in the order a run reaches them; each stopped run is
# picked up by the next (the last one, without a crash point, finishes).
# (actors/crashpoints.py: `stage` and `live` count messages published by the first copy and
# the swap's refill, `rebuild` entries of the KV rebuild.)
CRASH_POINTS = ("stage:50", "fenced", "commit", "live:100", "filled", "rebuild:20")
# While the run is stopped after its fence, backend 0 is SIGKILLed and restarted (it must
# come back on the fenced log); while it is stopped mid-swap (the live log half refilled),
# backend 1 is SIGKILLed and started again, and must not say ready before the swap is done.
KILL_WHILE_FENCED = "fenced"
KILL_MID_SWAP = "live:100"
# The next run deletes the log again, refills it and stops before the anchor and the
# marker: the restarted backend still waits then. (After `rebuild:20` the log is whole
# up to its marker, so the backend may be ready: the views' rebuild is shared.)
REFILLED_WITHOUT_MARKER = "filled"


def new_key() -> XKey:
    key = XKey.generate()
    remember(key.seed, "encryption seed")
    return key


def value(text: str) -> None:
    remember(text, "secret value")


def tokens(who: Identity) -> tuple[str, str]:
    return who.entity_jwt(), who.host_jwt()


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await connect(NatsOptions(servers=(url,)), name="procedure test", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


async def cli(
    env: dict[str, str], *args: str, program: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """A CLI run in a thread, so the load keeps running meanwhile."""
    return await anyio.to_thread.run_sync(
        lambda: run_cli(*args, env=env, timeout=180, program=program or CLI)
    )


async def audit_history(url: str, encryption: XKey) -> list[dict[str, object]]:
    """The event history (`audit export`, no access records) under `encryption`."""
    env = cli_env(None, ENCRYPTION_XKEY_SEED=encryption.seed)
    done = await cli(env, "audit", "export", "--nats-address", url)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def integrity_checks(url: str, encryption: XKey, tmp_path: Path) -> None:
    """`verify` (the chain), then a signed `audit export --access` that `audit verify` accepts."""
    env = cli_env(None, ENCRYPTION_XKEY_SEED=encryption.seed)
    done = await cli(env, "verify", "--nats-address", url)
    assert done.returncode == 0, done.stderr
    signer = SigningKey.generate(Role.ACCOUNT)
    remember(signer.seed, "audit signing seed")
    exported = tmp_path / "audit.jsonl"
    signed = {**env, "AUDIT_SIGNING_SEED": signer.seed}
    done = await cli(
        signed, "audit", "export", "--access", "--output", str(exported), "--nats-address", url
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"", done.stderr  # no record left out (a tag the key does not verify)
    done = await cli(cli_env(), "audit", "verify", str(exported), "--public-key", signer.public_key)
    assert done.returncode == 0, done.stderr


def puts_of(history: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    puts = [r for r in history if r["type"] == "secret_put"]
    return [(r["seq"], r.get("secret"), r.get("revision")) for r in puts]


def backend_problems(backends: Fleet) -> list[str]:
    """Lines no backend may log during the procedure: a traceback or an incident."""
    return [
        line
        for line in backends.logs().splitlines()
        if "Traceback" in line or "incident" in line.lower()
    ]


async def test_rolling_restarts_and_a_sigkill_under_load_fail_no_get(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The load harness on the procedure's moves without a rotation: two rolling restarts
    and a SIGKILL of one backend. No get fails but one the killed process had taken, no
    acknowledged write is lost, and the scan finds the (only) key in every stream kind."""
    url, transit, key = nats_server.url, new_key(), new_key()
    env = backend_env(transit, key)
    with fleet(url, tmp_path, nats_server.config.monitor_url) as backends:
        await backends.roll(env)
        async with client(url) as nc:
            admin = AdminClient(nc, NAMES, transit)
            reader = Identity()
            secrets, written, seeded = await populate(admin, reader.entity_key, 40, remember=value)
            load = Load(nc, NAMES, transit, *tokens(reader), secrets, written, value)
            async with load.running():
                await backends.roll(env)
                kill = await backends.kill(1)
                await backends.start(1, env)
                await backends.roll(env)
            print("load:", load.summary())
            assert load.failed_gets_outside([kill]) == [], (kill, load.failed_gets)
            assert load.wrong_values == []
            assert load.put_errors == []
            assert load.refusals == []  # no rotation: nothing fences writes
            assert len(load.acks) > 0
            host = HostClient(nc, NAMES)
            assert await unserved_writes(host, *tokens(reader), [*seeded, *load.acks]) == []
            (traces,) = await key_traces(nc, [key])
        found = {where.split("#")[0] for where in traces.found()}
        assert found >= {
            "SECRETS_nats-kv_events",
            "SECRETS_nats-kv_anchor",
            "SECRETS_nats-kv_access",
            f"KV_{NAMES.secrets_bucket}",
            f"KV_{NAMES.state_bucket}",
        }, found
        assert backend_problems(backends) == []


async def test_the_three_step_procedure_under_load(nats_server: NatsServer, tmp_path: Path) -> None:
    url, transit, old, new = nats_server.url, new_key(), new_key(), new_key()
    with fleet(url, tmp_path, nats_server.config.monitor_url) as backends:
        await backends.roll(backend_env(transit, old))
        async with client(url) as nc:
            admin = AdminClient(nc, NAMES, transit)
            reader = Identity()
            secrets, written, seeded = await populate(
                admin, reader.entity_key, SECRETS, remember=value
            )
            before = await audit_history(url, old)
            (control,) = await key_traces(nc, [old])
            assert control.opened, "the scan opens nothing even under the key in use"
            assert control.tagged, "the scan verifies no tag even under the key in use"

            both = backend_env(transit, old, new)
            load = Load(nc, NAMES, transit, *tokens(reader), secrets, written, value)
            kills: list[Kill] = []
            async with load.running():
                # Step 1: current + next, one backend at a time.
                await backends.roll(both)
                # Step 2: the online rotation, killed at each crash point, then finished.
                for point in CRASH_POINTS:
                    done = await cli(
                        rotation_env(transit, old, new),
                        "rotate-key",
                        "--online",
                        "--nats-address",
                        url,
                        program=crash_program(point),
                    )
                    assert (done.returncode, done.stdout) == (1, b""), (point, done.stderr)
                    assert b"Traceback" not in done.stderr, point
                    if point == KILL_WHILE_FENCED:
                        kills.append(await backends.kill(0))
                        await backends.start(0, both)
                    if point == KILL_MID_SWAP:
                        kills.append(await backends.kill(1))
                        backends.spawn(1, both)
                    if point == REFILLED_WITHOUT_MARKER:
                        restarted = backends.slots[1].text()
                        assert READY_LINE.decode() not in restarted, "ready on a refilled log"
                done = await cli(
                    rotation_env(transit, old, new), "rotate-key", "--online", "--nats-address", url
                )
                await backends.wait_ready(1)
                assert done.returncode == 0, done.stderr
                summary = done.stdout.decode()
                assert summary.count("\n") == 1, summary
                assert old.seed not in summary
                assert new.seed not in summary
                # Step 3: new only, one backend at a time.
                await backends.roll(backend_env(transit, new))
            print("load:", load.summary(), "| rotation:", summary.strip())

            assert load.failed_gets_outside(kills) == [], (kills, load.failed_gets)
            assert load.wrong_values == []
            assert load.put_errors == []
            assert len(load.acks) > 0
            host = HostClient(nc, NAMES)
            acknowledged: list[Ack] = [*seeded, *load.acks]
            assert await unserved_writes(host, *tokens(reader), acknowledged) == []

            after = await audit_history(url, new)
            assert after[: len(before)] == before, "the history before the rotation changed"
            assert sorted(puts_of(after), key=lambda r: r[0]) == puts_of(after)
            assert {(name, version) for _, name, version in puts_of(after)} == {
                (ack.name, ack.version) for ack in acknowledged
            }, "the log's puts are not exactly the acknowledged writes"
            others = [r["type"] for r in after[len(before) :] if r["type"] != "secret_put"]
            assert others == ["writes_fenced", "key_rotated"], others  # one fence, one rotation

            old_traces, new_traces = await key_traces(nc, [old, new])
        # The old key opens nothing anywhere, and authenticates nothing but the anchor's
        # history from before the rotation: the stream denies deletes (the backend's
        # signed checkpoints), and no backend trusts an anchor under the old key again
        # (the newest one, the only one read, is under the new key).
        history = f"{anchor_stream(NAMES.name)}#"
        assert old_traces.opened == [], old_traces.opened[:20]
        stray = [where for where in old_traces.tagged if not where.startswith(history)]
        assert stray == [], stray[:20]
        assert new_traces.opened
        assert any(where.startswith(history) for where in new_traces.tagged)
        assert any(not where.startswith(history) for where in new_traces.tagged)
        await integrity_checks(url, new, tmp_path)
        assert backend_problems(backends) == []

        # A backend given only the old key after the rotation refuses to start, in one line.
        await backends.stop(0)
        stale = backends.spawn(0, backend_env(transit, old))
        assert stale.proc is not None
        code = await anyio.to_thread.run_sync(stale.proc.wait, 60)
        assert code != 0
        errors = [line for line in stale.text().splitlines() if line.startswith(PREFIX)]
        assert len(errors) == 1, stale.text()
        assert "ENCRYPTION_XKEY_SEED" in errors[0], errors
        assert "Traceback" not in stale.text()
