"""Durability: what survives a killed process, a restarted server, and a second process.

Guarantees under test (each test's docstring says which):

- An acknowledged write is durable. `put_secret` answers with a revision only after the
  event is in the JetStream log and the replying process's views include it, so
  killing that process (SIGKILL, no shutdown) or restarting NATS loses nothing that
  was acknowledged, and no revision is ever handed out twice.
- A backend answers nothing before it has caught up with the log (readiness).
- Read-your-writes across processes: once a write is acknowledged, a `get` served by
  ANY process reflects it (never a stale value, never a stale `Unauthorized`).

The backends here are real `secrets-nats-kv run` processes (they must be killable) on a
real nats-server with file storage; the clients are the project's own admin and host
clients, speaking the wire protocol as a wasmCloud host does.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import BackendNotAnswering, Unauthorized
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import SealBox
from support.harness import (
    Identity,
    Keys,
    cli_env,
    run_cli,
    spawn_run,
)
from support.host import HostClient

NAMES = BackendNames()
SECRETS_STREAM = f"KV_{NAMES.secrets_bucket}"
STATE_STREAM = f"KV_{NAMES.state_bucket}"
READY_LINE = b"backend ready"


# --- real `run` processes ------------------------------------------------------------------


@dataclass
class RunProcess:
    """One `secrets-nats-kv run` subprocess and the log it writes."""

    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, deadline: float = 30.0) -> None:
        """Until its log says `backend ready` (written once it serves), bounded."""
        end = time.monotonic() + deadline
        while READY_LINE not in self.log.read_bytes():
            code = self.proc.poll()
            assert code is None, f"run exited with {code}: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < end, f"not ready: {self.log.read_text()[-2000:]}"
            time.sleep(0.02)  # poll a condition with a deadline: there is no other signal

    def stop(self) -> None:
        """SIGTERM: the backend drains and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0, self.log.read_text()[-2000:]

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, like a crash."""
        self.proc.kill()
        self.proc.wait(15)


@dataclass
class Runner:
    """Starts `run` processes for one test; whatever is still running is killed after it."""

    directory: Path
    started: list[RunProcess] = field(default_factory=list)

    def start(self, url: str, keys: Keys) -> RunProcess:
        log = self.directory / f"run-{len(self.started)}.log"
        log.touch()
        proc = spawn_run(url, cli_env(keys), log=log)
        process = RunProcess(proc, log)
        self.started.append(process)
        return process

    def start_ready(self, url: str, keys: Keys, count: int = 1) -> list[RunProcess]:
        processes = [self.start(url, keys) for _ in range(count)]
        for process in processes:
            process.wait_ready()
        return processes


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    runner = Runner(tmp_path)
    try:
        yield runner
    finally:
        for process in runner.started:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(15)


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await connect(NatsOptions(servers=(url,)), name="durability test", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


def jwts(who: Identity) -> dict[str, str]:
    return {"entity_jwt": who.entity_jwt(), "host_jwt": who.host_jwt()}


def queue_deliveries(server: NatsServer) -> dict[int, int]:
    """Requests NATS delivered to each backend connection's queue subscription, by cid."""
    url = f"{server.config.monitor_url}/connz?subs=detail&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as reply:
        connz = json.load(reply)
    counts = {}
    for conn in connz["connections"]:
        for sub in conn.get("subscriptions_list_detail") or ():
            if sub.get("qgroup") == NAMES.queue_group:
                counts[conn["cid"]] = int(sub["msgs"])
    return counts


async def kv_entry(nc: NATS, keys: Keys, revision: int) -> tuple[str, bytes] | None:
    """The secrets bucket's message at `revision`: its subject and opened value."""
    try:
        msg = await nc.jetstream().get_msg(SECRETS_STREAM, seq=revision)
    except nats.js.errors.NotFoundError:
        return None
    value = SealBox(keys.encryption, keys.encryption).open(msg.data) if msg.data else b""
    return str(msg.subject), value


# --- (a) SIGKILL under load --------------------------------------------------------------

WORKERS = 4


@pytest.mark.anyio
async def test_sigkill_of_one_process_loses_no_acknowledged_put(
    nats_server: NatsServer, runner: Runner
) -> None:
    """Two `run` processes share the queue group while 4 clients stream put-then-get;
    one process is SIGKILLed mid-stream.

    Guaranteed: every put that returned a revision is readable afterwards at that
    revision, with its value, through the survivor and in the KV bucket; no revision is
    handed out twice; gets keep succeeding after the kill. Not guaranteed: the request
    a client had in flight on the killed process gets an answer; it times out
    (`BackendNotAnswering`) and the client retries (a put retry reuses its request id,
    so it lands once). Hence at most one failed attempt per client, and never a wrong
    value or any other error.
    """
    keys = Keys()
    victim, _survivor = runner.start_ready(nats_server.url, keys, count=2)
    who = Identity()
    names = [f"kill-{n}" for n in range(WORKERS)]
    acked: list[tuple[str, int, str]] = []
    timeouts: list[BackendNotAnswering] = []
    gets_after_kill = 0
    before_kill, after_kill, stop = anyio.Event(), anyio.Event(), anyio.Event()
    killed = False

    async with client(nats_server.url) as nc:
        admin = AdminClient(nc, NAMES, keys.transit, timeout=3.0, retries=3)
        host = HostClient(nc, NAMES, timeout=3.0)
        await admin.add_mapping(who.entity_key, names)
        tokens = jwts(who)

        async def read(name: str, version: str | None = None) -> wire.Secret:
            for _ in range(4):
                try:
                    return await host.get(name, version=version, **tokens)
                except BackendNotAnswering as exc:
                    timeouts.append(exc)
            raise AssertionError(f"no backend answered a get of {name} four times running")

        async def worker(name: str) -> None:
            nonlocal gets_after_kill
            count = 0
            while not stop.is_set():
                value = f"{name}-{count}-{secrets.token_hex(8)}"
                count += 1
                try:
                    revision = await admin.put_secret(name, value)
                except BackendNotAnswering as exc:  # every retry of one put timed out
                    timeouts.append(exc)
                    continue
                acked.append((name, revision, value))
                latest = await read(name)
                assert (latest.version, latest.string_secret) == (str(revision), value)
                if killed:
                    gets_after_kill += 1
                    if gets_after_kill >= 40:
                        after_kill.set()
                elif len(acked) >= 40:
                    before_kill.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(worker, name)
                await before_kill.wait()
                served = queue_deliveries(nats_server)
                assert len(served) == 2, served
                assert all(count > 0 for count in served.values()), served  # both took load
                victim.kill()
                killed = True
                await after_kill.wait()
                stop.set()

        assert len(timeouts) <= WORKERS, f"{len(timeouts)} timeouts for {WORKERS} clients"
        revisions = [revision for _, revision, _ in acked]
        assert len(set(revisions)) == len(revisions), "a revision was handed out twice"
        for name in names:
            mine = [revision for n, revision, _ in acked if n == name]
            assert mine == sorted(mine)
        assert len(queue_deliveries(nats_server)) == 1  # only the survivor is left

        timeouts.clear()
        for name, revision, value in acked:
            pinned = await read(name, str(revision))
            assert (pinned.version, pinned.string_secret) == (str(revision), value)
            assert await kv_entry(nc, keys, revision) == (
                f"$KV.{NAMES.secrets_bucket}.{name}",
                value.encode(),
            )
        assert timeouts == [], "the survivor alone timed out"


# --- (b) restart everything ---------------------------------------------------------------


@dataclass
class Population:
    """What test (b) wrote: every revision of every secret (its value, or None for a delete
    marker), who may read what, and which secrets end deleted."""

    revisions: dict[str, list[int]] = field(default_factory=dict)
    values: dict[int, str | bytes | None] = field(default_factory=dict)
    readers: list[Identity] = field(default_factory=list)
    allowed: dict[str, set[str]] = field(default_factory=dict)  # entity key -> names
    deleted: set[str] = field(default_factory=set)


async def populate(admin: AdminClient) -> Population:
    population = Population()

    def note(name: str, revision: int, value: str | bytes | None) -> None:
        population.revisions.setdefault(name, []).append(revision)
        population.values[revision] = value

    async def put(name: str, value: str | bytes) -> None:
        note(name, await admin.put_secret(name, value), value)

    for n in range(3):
        await put("alpha", f"alpha-{n}-{secrets.token_hex(4)}")
    for _ in range(2):
        await put("beta", secrets.token_bytes(40))
    await put("gamma", '{"user":"u","password":"p"}')
    note("gamma", await admin.delete("gamma"), None)
    note("gamma", await admin.undelete("gamma"), '{"user":"u","password":"p"}')
    await put("gamma", "gamma-last")
    await put("delta", "delta-gone")
    note("delta", await admin.delete("delta"), None)
    population.deleted = {"delta"}
    first, second, third = Identity(), Identity.provider(), Identity()
    await admin.add_mapping(first.entity_key, ["alpha", "beta", "gamma"])
    await admin.add_mapping(second.entity_key, ["alpha", "delta"])
    await admin.remove_mapping(second.entity_key, ["alpha"])
    await admin.add_mapping(third.entity_key, ["beta"])
    await admin.remove_mapping(third.entity_key, ["beta"])
    population.readers = [first, second, third]
    population.allowed = {
        first.entity_key: {"alpha", "beta", "gamma"},
        second.entity_key: {"delta"},
        third.entity_key: set(),
    }
    return population


def written(population: Population, keys: Keys) -> dict[str, Any]:
    """What a snapshot must show, worked out from what `populate` wrote (not read back)."""

    def read(value: str | bytes, revision: int) -> tuple[Any, ...]:
        if isinstance(value, bytes):
            return (str(revision), None, list(value))  # the wire's binary_secret: a list
        return (str(revision), value, None)

    seen: dict[str, Any] = {}
    rows = []
    for name, revisions in sorted(population.revisions.items()):
        readable = [r for r in revisions if population.values[r] is not None]
        latest = None if name in population.deleted else readable[-1]
        rows.append((name, latest or 0, len(readable), name in population.deleted))
    seen["list"] = rows
    seen["mappings"] = {
        entity: sorted(names) for entity, names in sorted(population.allowed.items())
    }
    for reader in population.readers:
        for name, revisions in population.revisions.items():
            latest = rows[[row[0] for row in rows].index(name)][1]
            for version in [None, *map(str, revisions)]:
                revision = latest if version is None else int(version)
                value = population.values.get(revision) if revision else None
                if name not in population.allowed[reader.entity_key]:
                    expected: tuple[Any, ...] = ("error", "Unauthorized")
                elif name in population.deleted or value is None:
                    expected = ("error", "SecretNotFound")
                else:
                    expected = read(value, revision)
                seen[f"{reader.entity_key} {name} {version}"] = expected
    seen["kv"] = [
        (
            f"$KV.{NAMES.secrets_bucket}.{name}",
            b"" if population.values[revision] is None else _plain(population.values[revision]),  # type: ignore[arg-type]
        )
        for revision, name in sorted(
            (r, n) for n, revisions in population.revisions.items() for r in revisions
        )
    ]
    seen["state"] = {entity: sorted(names) for entity, names in population.allowed.items()}
    return seen


def _plain(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def matches_what_was_written(seen: dict[str, Any], population: Population, keys: Keys) -> None:
    """The snapshot holds exactly what was written (the log's head aside)."""
    expected = written(population, keys)
    assert [row[:4] for row in seen["list"]] == expected["list"]
    assert seen["mappings"] == expected["mappings"]
    for key, value in expected.items():
        if key not in ("list", "mappings", "kv", "state"):
            assert seen[key] == value, key
    assert seen["kv"] == expected["kv"]
    assert seen["state"] == expected["state"]


def outcome(result: wire.Secret | Exception) -> tuple[Any, ...]:
    if isinstance(result, Exception):
        return ("error", type(result).__name__)
    return (result.version, result.string_secret, result.binary_secret)


async def snapshot(url: str, keys: Keys, population: Population) -> dict[str, Any]:
    """Everything a restart must keep, read through the backend and straight from NATS."""
    async with client(url) as nc:
        admin = AdminClient(nc, NAMES, keys.transit)
        host = HostClient(nc, NAMES)
        seen: dict[str, Any] = {
            "list": [
                (s.name, s.version, s.versions, s.deleted, s.updated_at)
                for s in await admin.list_secrets()
            ],
            "mappings": await admin.mappings(),
        }
        for reader in population.readers:
            for name, revisions in population.revisions.items():
                for version in [None, *map(str, revisions)]:
                    try:
                        result: wire.Secret | Exception = await host.get(
                            name, version=version, **jwts(reader)
                        )
                    except Exception as exc:
                        result = exc
                    seen[f"{reader.entity_key} {name} {version}"] = outcome(result)
        js = nc.jetstream()
        last = (await js.stream_info(SECRETS_STREAM)).state.last_seq
        seen["kv"] = [await kv_entry(nc, keys, revision) for revision in range(1, last + 1)]
        state = {}
        for reader in population.readers:
            subject = f"$KV.{NAMES.state_bucket}.{reader.entity_key}"
            state[reader.entity_key] = json.loads(
                (await js.get_last_msg(STATE_STREAM, subject)).data or b"null"
            )
        seen["state"] = state
        seen["log"] = (await js.stream_info(f"SECRETS_{NAMES.name}_events")).state.last_seq
    return seen


@pytest.mark.anyio
async def test_everything_survives_restarting_nats_and_the_backend(
    nats_server: NatsServer, runner: Runner
) -> None:
    """Secrets (every version, deleted ones too), mappings, both KV buckets and the log
    come back identical, revisions included, after stopping the backend and restarting
    nats-server cleanly, and again after SIGKILLing nats-server. A put afterwards gets
    the next revision: none is reused."""
    keys = Keys()
    (first,) = runner.start_ready(nats_server.url, keys)
    async with client(nats_server.url) as nc:
        population = await populate(AdminClient(nc, NAMES, keys.transit))
    before = await snapshot(nats_server.url, keys, population)
    matches_what_was_written(before, population, keys)
    first.stop()

    nats_server.restart()
    (second,) = runner.start_ready(nats_server.url, keys)
    assert await snapshot(nats_server.url, keys, population) == before
    second.stop()

    nats_server.kill()
    nats_server.start()
    runner.start_ready(nats_server.url, keys)
    assert await snapshot(nats_server.url, keys, population) == before
    async with client(nats_server.url) as nc:
        revision = await AdminClient(nc, NAMES, keys.transit).put_secret("alpha", "after")
    assert revision == len(before["kv"]) + 1


# --- (c) readiness: caught up before answering ---------------------------------------------


@pytest.mark.anyio
async def test_a_new_backend_answers_only_after_catching_up(
    nats_server: NatsServer, runner: Runner
) -> None:
    """A backend started on an existing log must not answer anything before its view
    has folded the whole log: the very first `get` it answers already sees the newest
    version and the newest mapping (never `SecretNotFound`, `Unauthorized` or an old
    version). The client polls from before the process starts, so it catches the
    earliest moment the backend answers."""
    keys = Keys()
    (writer,) = runner.start_ready(nats_server.url, keys)
    who = Identity()
    names = [f"catch-{n}" for n in range(10)]
    latest: dict[str, tuple[str, str]] = {}
    async with client(nats_server.url) as nc:
        admin = AdminClient(nc, NAMES, keys.transit)
        for round_ in range(15):
            for name in names:
                value = f"{name}-{round_}-{secrets.token_hex(4)}"
                latest[name] = (str(await admin.put_secret(name, value)), value)
        await admin.add_mapping(who.entity_key, names)  # the very last event
    writer.stop()

    async with client(nats_server.url) as nc:
        host = HostClient(nc, NAMES, timeout=1.0)
        with pytest.raises(BackendNotAnswering):
            await host.server_xkey()  # nobody is serving
        runner.start(nats_server.url, keys)
        tokens = jwts(who)
        with anyio.fail_after(30):
            while True:
                try:
                    first = await host.get(names[-1], **tokens)
                    break
                except BackendNotAnswering:
                    await anyio.sleep(0.01)  # poll with a deadline: waiting for it to answer
        assert (first.version, first.string_secret) == latest[names[-1]]
        for name in names:
            got = await host.get(name, **tokens)
            assert (got.version, got.string_secret) == latest[name]


# --- (d) read-your-writes across processes -------------------------------------------------


@pytest.mark.anyio
async def test_read_your_writes_across_two_processes(
    nats_server: NatsServer, runner: Runner
) -> None:
    """With two `run` processes in the queue group, each write is answered by one of
    them and the read right after by either (NATS picks at random, so about half the
    reads go to the process that did not do the write; the monitor's per-connection
    counts show both served a large share). Guaranteed: zero stale reads: the get after
    an acknowledged put returns that put's revision and value; after an acknowledged
    add-mapping the new entity is allowed; after an acknowledged remove-mapping it is
    refused."""
    keys = Keys()
    runner.start_ready(nats_server.url, keys, count=2)
    owner = Identity()
    async with client(nats_server.url) as nc:
        admin = AdminClient(nc, NAMES, keys.transit)
        host = HostClient(nc, NAMES)
        await admin.add_mapping(owner.entity_key, ["ryw"])
        start = queue_deliveries(nats_server)
        for n in range(40):
            value = f"ryw-{n}-{secrets.token_hex(6)}"
            revision = await admin.put_secret("ryw", value)
            got = await host.get("ryw", **jwts(owner))
            assert (got.version, got.string_secret) == (str(revision), value), f"stale at {n}"

            newcomer = Identity()
            await admin.add_mapping(newcomer.entity_key, ["ryw"])
            got = await host.get("ryw", **jwts(newcomer))  # Unauthorized here is a stale read
            assert (got.version, got.string_secret) == (str(revision), value)
            await admin.remove_mapping(newcomer.entity_key, ["ryw"])
            with pytest.raises(Unauthorized):
                await host.get("ryw", **jwts(newcomer))
        end = queue_deliveries(nats_server)
    served = [end[cid] - start[cid] for cid in start]
    assert len(served) == 2
    assert min(served) >= 0.2 * sum(served), f"one process barely served: {served}"


# --- destroy must stay durable: restarts, second writers, rebuild ---------------------------
#
# These fail until secrets_nats_kv/jetstream.py treats JetStream's err_code 10043
# ("sequence N not found": the message was already erased) as "already gone", like
# 10037/10057. Without that, erasing a revision a second time (a second writer, a
# restarted backend refolding the log, `rebuild`, or `destroy --all` after `destroy
# --version`) raises, and the KV writer retries forever: every later write times out.


async def destroy_interior_revision(admin: AdminClient) -> None:
    await admin.put_secret("pad", "first message of the bucket")
    await admin.put_secret("shred", "one")
    await admin.put_secret("shred", "two")
    await admin.put_secret("pad", "a later message")
    assert await admin.destroy("shred", version=2) == [2]


def impatient(nc: NATS, keys: Keys) -> AdminClient:
    """An admin client that fails fast: a healthy backend answers a put in milliseconds."""
    return AdminClient(nc, NAMES, keys.transit, timeout=4.0, retries=0)


@pytest.mark.anyio
async def test_destroy_all_after_destroy_version_keeps_the_backend_writable(
    nats_server: NatsServer, runner: Runner
) -> None:
    keys = Keys()
    runner.start_ready(nats_server.url, keys)
    async with client(nats_server.url) as nc:
        admin = impatient(nc, keys)
        await destroy_interior_revision(admin)
        # Revision 2 is already shredded, so it is no longer one of the secret's: destroying
        # the rest shreds only 3, the same answer a restarted backend gives (test_model).
        assert await admin.destroy("shred", all=True) == [3]
        assert await admin.put_secret("after", "still writable") == 5


@pytest.mark.anyio
async def test_a_backend_restarted_after_destroy_stays_writable(
    nats_server: NatsServer, runner: Runner
) -> None:
    keys = Keys()
    (first,) = runner.start_ready(nats_server.url, keys)
    async with client(nats_server.url) as nc:
        await destroy_interior_revision(impatient(nc, keys))
    first.stop()
    runner.start_ready(nats_server.url, keys)
    async with client(nats_server.url) as nc:
        assert await impatient(nc, keys).put_secret("after", "still writable") == 5


@pytest.mark.anyio
async def test_rebuild_after_destroy_reproduces_the_buckets(
    nats_server: NatsServer, runner: Runner
) -> None:
    keys = Keys()
    (first,) = runner.start_ready(nats_server.url, keys)
    who = Identity()
    async with client(nats_server.url) as nc:
        admin = impatient(nc, keys)
        await destroy_interior_revision(admin)
        await admin.add_mapping(who.entity_key, ["pad", "shred"])
    population = Population({"pad": [1, 4], "shred": [2, 3]}, [who])
    before = await snapshot(nats_server.url, keys, population)
    first.stop()

    env = cli_env(keys, NATS_ADDRESS=nats_server.url.removeprefix("nats://"))
    result = await anyio.to_thread.run_sync(lambda: run_cli("rebuild", env=env))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"rebuilt views from 6 events")
    runner.start_ready(nats_server.url, keys)
    assert await snapshot(nats_server.url, keys, population) == before
