"""The operator's online key rotation, under load, with real processes (issue 15).

Three parts, shared by tests/nats/test_rotation_procedure.py and bench/bench_rotation.py:

- `Fleet`: two `secrets-nats-kv run` subprocesses on one server (so a SIGKILL is real),
  restarted one at a time with a given key configuration; each start waits for that
  process's own `backend ready` line (written once it serves), never a fixed sleep.
- `Load`: a wasmCloud host doing a real protocol `get` every 20 ms (each its own task, a
  10 s timeout and no retry, as the host does) and an admin doing a `put` every 200 ms,
  recording every failed get with its time, every acknowledged write (name, version,
  value) and every refusal of the rotation's write fence (`RotationInProgress`), from which
  the longest pause between acknowledged writes follows.
- Checks afterwards: every acknowledged write served at its version with its value;
  `old_key_scan` reads every stream of the server (event log, anchor, access log, both KV
  buckets with their history, any staging stream) and counts what a key opens or tags.

Why gets are never retried here: a wasmCloud host asks once, so a retry would hide the
very failure the procedure must not cause. A get a SIGKILLed backend had already taken
cannot be answered by anyone; `Load.failed_gets_outside` tells those (sent before the
kill, failed after it) apart from real failures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
from nats.aio.client import Client as NATS

from events.types import UndecodableEvent, decode_event
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.barrier import (
    CHAIN_HEADER,
    ENTRY_TAG_HEADER,
    KV_TAG_HEADER,
    PREV_HEADER,
    Barrier,
    digest,
)
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import BackendNotAnswering, DecryptionError, RotationInProgress
from secrets_nats_kv.nats.jetstream import MSG_ID_HEADER
from secrets_nats_kv.nats.reader import read_stream
from secrets_nats_kv.xkeys import XKey

from .host import HostClient

READY_LINE = b"backend ready"
GET_EVERY_S = 0.020
PUT_EVERY_S = 0.200
GET_TIMEOUT_S = 10.0  # what a wasmCloud host waits, once
SUBJECT_HEADER = "Nats-Subject"  # a direct get's reply names the stored subject here
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "secrets_nats_kv.app.cli"]
Remember = Callable[[str], None]  # the leak registry's `remember` in tests; bench: nothing


def _ignore(value: str) -> None:
    return None


# --- key configurations ---------------------------------------------------------------------


def process_env(**seeds: str) -> dict[str, str]:
    """This interpreter's environment without any seed, plus `seeds`, for a CLI process.
    (tests/support/harness.py's `cli_env`, without the test-only imports: the bench uses
    this module too.)"""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
    env["PYTHONPATH"] = str(REPO)
    env.update(seeds)
    return env


def backend_env(transit: XKey, current: XKey, next_: XKey | None = None) -> dict[str, str]:
    """The environment of a `run` holding `current` (and `next_`, the procedure's step 1)."""
    env = process_env(TRANSIT_XKEY_SEED=transit.seed, ENCRYPTION_XKEY_SEED=current.seed)
    if next_ is not None:
        env["NEXT_ENCRYPTION_XKEY_SEED"] = next_.seed
    return env


def rotation_env(transit: XKey, old: XKey, new: XKey) -> dict[str, str]:
    """The environment of `rotate-key` (online or not): the current key and the new one."""
    return process_env(
        TRANSIT_XKEY_SEED=transit.seed,
        ENCRYPTION_XKEY_SEED=old.seed,
        NEW_ENCRYPTION_XKEY_SEED=new.seed,
    )


def spawn_run(url: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`secrets-nats-kv run` as a real process writing to `log`."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [*CLI, "run", "--nats-address", url],
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


# --- two real `run` processes --------------------------------------------------------------


@dataclass
class Slot:
    """One of the fleet's backends: its current process and the log that process writes."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    starts: int = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


class BackendExited(AssertionError):
    """A `run` process exited before it said it was ready (its last log line says why)."""

    def __init__(self, code: int, last_line: str) -> None:
        super().__init__(f"run exited with {code}: {last_line}")
        self.code = code
        self.last_line = last_line


@dataclass
class Fleet:
    """Two `run` processes sharing the queue group of the default names on `url`."""

    url: str
    directory: Path
    monitor_url: str  # the server's HTTP monitor: who is in the queue group (`kill`)
    names: BackendNames = field(default_factory=BackendNames)
    size: int = 2
    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]

    def spawn(self, index: int, env: Mapping[str, str]) -> Slot:
        """Start slot `index` (which must be stopped) with `env`; its log is a fresh file."""
        slot = self.slots[index]
        assert slot.proc is None or slot.proc.poll() is not None, f"backend {index} runs"
        slot.starts += 1
        slot.log = self.directory / f"run-{index}-{slot.starts}.log"
        slot.log.touch()
        slot.proc = spawn_run(self.url, env, slot.log)
        return slot

    async def wait_ready(self, index: int, deadline: float = 60.0) -> None:
        """Until slot `index`'s process logs `backend ready`; `BackendExited` if it exits."""
        slot = self.slots[index]
        assert slot.proc is not None
        assert slot.log is not None
        with anyio.fail_after(deadline):
            while READY_LINE not in slot.log.read_bytes():
                code = slot.proc.poll()
                if code is not None:
                    lines = slot.text().strip().splitlines() or [""]
                    raise BackendExited(code, lines[-1])
                await anyio.sleep(0.02)  # polling the log for the event the process reports

    async def start(self, index: int, env: Mapping[str, str]) -> None:
        self.spawn(index, env)
        await self.wait_ready(index)

    async def stop(self, index: int) -> None:
        """SIGTERM: the backend drains (answers what it took) and exits 0."""
        proc = self.slots[index].proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(proc.wait, 30)
        assert code == 0, self.slots[index].text()[-2000:]

    async def kill(self, index: int, deadline: float = 30.0) -> Kill:
        """SIGKILL, like a crash. Returns when it was sent and when the server had dropped
        the process's connection (until then NATS may still hand it requests)."""
        proc = self.slots[index].proc
        assert proc is not None
        members = await anyio.to_thread.run_sync(self.queue_members)
        at = time.monotonic()
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait, 30)
        with anyio.fail_after(deadline):
            # No event tells a client that the server dropped another's connection: poll
            # the server's monitor, bounded.
            while await anyio.to_thread.run_sync(self.queue_members) >= members:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        return Kill(at, time.monotonic())

    def queue_members(self) -> int:
        """Connections with a subscription in the backends' queue group, per the server."""
        url = f"{self.monitor_url}/connz?subs=detail&limit=1024"
        with urllib.request.urlopen(url, timeout=5) as reply:
            connz = json.load(reply)
        group = self.names.queue_group
        return sum(
            any(sub.get("qgroup") == group for sub in conn.get("subscriptions_list_detail") or ())
            for conn in connz["connections"]
        )

    async def roll(self, env: Mapping[str, str]) -> None:
        """The operator's rolling restart: one backend at a time, each ready before the next."""
        for index in range(self.size):
            if self.slots[index].proc is not None:
                await self.stop(index)
            await self.start(index, env)

    def logs(self) -> str:
        """Everything every process of the fleet logged so far, in start order per slot."""
        paths = sorted(self.directory.glob("run-*-*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(path.read_text(errors="replace") for path in paths)

    def close(self) -> None:
        """Kill whatever still runs (a failed test's leftovers)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait(15)


@dataclass(frozen=True)
class Kill:
    """A SIGKILL of a backend: sent `at`, and the server had noticed by `noticed`."""

    at: float
    noticed: float


@contextlib.contextmanager
def fleet(url: str, directory: Path, monitor_url: str) -> Iterator[Fleet]:
    """A `Fleet` whose processes are all gone on exit."""
    running = Fleet(url, directory, monitor_url)
    try:
        yield running
    finally:
        running.close()


# --- the load: a host's gets and an admin's puts --------------------------------------------


def is_fence_refusal(exc: BaseException) -> bool:
    """The write fence's refusal (`RotationInProgress`): expected while a rotation swaps."""
    return isinstance(exc, RotationInProgress)


@dataclass(frozen=True)
class Ack:
    name: str
    version: int
    value: str
    at: float


@dataclass(frozen=True)
class FailedGet:
    name: str
    sent: float
    failed: float
    error: str


@dataclass
class Load:
    """A host's gets every 20 ms and an admin's puts every 200 ms, with what came of each.

    `names` must exist (and be mapped to `reader`) before the load starts: every get asks
    the latest version of one of them and must get a value that was written to it.
    """

    nc: NATS
    names: BackendNames
    admin_key: XKey
    entity_jwt: str  # the reader's tokens: an entity mapped to every secret, and its host
    host_jwt: str
    secrets: Sequence[str]
    written: dict[str, set[str]]  # every value each secret was ever given (or is being)
    remember: Remember = _ignore
    gets: int = 0
    failed_gets: list[FailedGet] = field(default_factory=list)
    wrong_values: list[str] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    refusals: list[float] = field(default_factory=list)
    put_errors: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    _stop: anyio.Event = field(default_factory=anyio.Event)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        """The load runs while the block does; on exit it stops and every get has ended."""
        host = HostClient(self.nc, self.names, timeout=GET_TIMEOUT_S)
        admin = AdminClient(self.nc, self.names, self.admin_key, timeout=5.0, retries=2)
        entity_jwt, host_jwt = self.entity_jwt, self.host_jwt
        self.started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._gets, tg, host, entity_jwt, host_jwt)
            tg.start_soon(self._puts, admin)
            try:
                yield self
            finally:
                self._stop.set()
        self.ended = time.monotonic()

    async def _gets(
        self, tg: anyio.abc.TaskGroup, host: HostClient, entity_jwt: str, host_jwt: str
    ) -> None:
        tick = 0
        while not self._stop.is_set():
            name = self.secrets[tick % len(self.secrets)]
            tg.start_soon(self._get, host, name, entity_jwt, host_jwt)
            tick += 1
            await _until(self.started + tick * GET_EVERY_S)

    async def _get(self, host: HostClient, name: str, entity_jwt: str, host_jwt: str) -> None:
        self.gets += 1
        sent = time.monotonic()
        try:
            secret = await host.get(name, entity_jwt=entity_jwt, host_jwt=host_jwt)
        except Exception as exc:  # every failure is the finding: keep its kind and time
            self.failed_gets.append(FailedGet(name, sent, time.monotonic(), type(exc).__name__))
            return
        if secret.string_secret not in self.written[name]:
            self.wrong_values.append(f"{name} v{secret.version}")

    async def _puts(self, admin: AdminClient) -> None:
        count = 0
        while not self._stop.is_set():
            name = self.secrets[(count * 7) % len(self.secrets)]
            value = f"load {count} {os.urandom(6).hex()}"
            self.remember(value)
            self.written[name].add(value)
            count += 1
            try:
                version = await admin.put_secret(name, value)
            except Exception as exc:
                if is_fence_refusal(exc):
                    self.refusals.append(time.monotonic())
                else:
                    self.put_errors.append(f"{name}: {type(exc).__name__}: {exc}")
            else:
                self.acks.append(Ack(name, version, value, time.monotonic()))
            await _until(self.started + count * PUT_EVERY_S)

    def longest_pause(self) -> float:
        """The longest time without an acknowledged write (from the start to the end)."""
        marks = [self.started, *(ack.at for ack in self.acks), self.ended or time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(marks))

    def failed_gets_outside(self, kills: Sequence[Kill]) -> list[FailedGet]:
        """Failed gets not explained by a SIGKILL: a get sent before the server noticed a
        kill, and timed out after the kill, may have been handed to the killed process,
        which can never answer."""

        def explained(failure: FailedGet) -> bool:
            timed_out = failure.error == BackendNotAnswering.__name__
            return timed_out and any(
                failure.sent <= kill.noticed and failure.failed >= kill.at for kill in kills
            )

        return [failure for failure in self.failed_gets if not explained(failure)]

    def summary(self) -> dict[str, float | int]:
        return {
            "gets": self.gets,
            "failed_gets": len(self.failed_gets),
            "acknowledged_puts": len(self.acks),
            "refused_puts": len(self.refusals),
            "put_errors": len(self.put_errors),
            "longest_write_pause_s": round(self.longest_pause(), 3),
        }


async def _until(moment: float) -> None:
    """Sleep until `moment` (`time.monotonic`): the load's schedule, not a wait for state."""
    await anyio.sleep(max(0.0, moment - time.monotonic()))


async def populate(
    admin: AdminClient, reader: str, count: int, versions: int = 2, remember: Remember = _ignore
) -> tuple[list[str], dict[str, set[str]], list[Ack]]:
    """`count` secrets with `versions` versions each, mapped to the entity `reader` (public
    key), 16 puts in flight."""
    secrets = [f"rot-{i:04d}" for i in range(count)]
    written: dict[str, set[str]] = {name: set() for name in secrets}
    acks: list[Ack] = []
    limiter = anyio.CapacityLimiter(16)

    async def put(name: str, round_: int) -> None:
        value = f"{name} v{round_} {os.urandom(6).hex()}"
        remember(value)
        written[name].add(value)
        async with limiter:
            acks.append(Ack(name, await admin.put_secret(name, value), value, time.monotonic()))

    for round_ in range(versions):
        async with anyio.create_task_group() as tg:
            for name in secrets:
                tg.start_soon(put, name, round_)
    await admin.add_mapping(reader, secrets)
    return secrets, written, acks


async def unserved_writes(
    host: HostClient, entity_jwt: str, host_jwt: str, acks: Sequence[Ack]
) -> list[str]:
    """Every acknowledged write read back at its version: what is missing or different."""
    problems: list[str] = []
    versions: dict[int, Ack] = {}
    for ack in acks:
        if ack.version in versions:
            problems.append(f"version {ack.version} acknowledged twice")
        versions[ack.version] = ack
    limiter = anyio.CapacityLimiter(16)

    async def check(ack: Ack) -> None:
        async with limiter:
            try:
                secret = await host.get(
                    ack.name, entity_jwt=entity_jwt, host_jwt=host_jwt, version=str(ack.version)
                )
            except Exception as exc:
                problems.append(f"{ack.name} v{ack.version}: {type(exc).__name__}")
                return
        if (secret.version, secret.string_secret) != (str(ack.version), ack.value):
            problems.append(f"{ack.name} v{ack.version}: served as v{secret.version}, other value")

    async with anyio.create_task_group() as tg:
        for ack in acks:
            tg.start_soon(check, ack)
    return problems


# --- the old-key scan ---------------------------------------------------------------------


@dataclass
class KeyTraces:
    """What one key opens or authenticates across a deployment's streams."""

    messages: int = 0
    opened: list[str] = field(default_factory=list)  # sealed values it opens
    tagged: list[str] = field(default_factory=list)  # tags or links it verifies

    def found(self) -> list[str]:
        return self.opened + self.tagged


class _Sealed(msgspec.Struct):
    sealed: bytes = b""


_sealed_of = msgspec.json.Decoder(_Sealed)


def _sealed_in(data: bytes) -> bytes | None:
    """The sealed value an event body carries (`SecretPut.sealed`), if it carries one."""
    try:
        decode_event(data)
        return _sealed_of.decode(data).sealed or None
    except (UndecodableEvent, msgspec.DecodeError):
        return None


def _opens(barrier: Barrier, blob: bytes) -> bool:
    try:
        barrier.open(blob)
    except (DecryptionError, ValueError):
        return False
    return True


def traces_in(
    barrier: Barrier, stream: str, seq: int, subject: str, data: bytes, headers: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """What of one stored message `barrier` opens (its body, or an event's sealed value) and
    which of its tags it verifies, in every form the project tags with: an event's entry tag
    and chain link, a KV entry's tag (bucket, key, revision), the anchor's (stream, subject,
    sequence) and an access batch's (stream, batch id, 0)."""
    where = f"{stream}#{seq}"
    opened, tagged = [], []
    sealed = _sealed_in(data)
    if _opens(barrier, data) or (sealed is not None and _opens(barrier, sealed)):
        opened.append(where)
    tag = headers.get(ENTRY_TAG_HEADER)
    if tag is not None and barrier.verify(seq, data, tag):
        tagged.append(f"{where} entry tag")
    chain, previous = headers.get(CHAIN_HEADER), headers.get(PREV_HEADER)
    if chain is not None and previous is not None:
        links = (barrier.link(seq, digest(data), previous), barrier.erased_link(seq, previous))
        if any(barrier.links(chain, link) for link in links):
            tagged.append(f"{where} chain link")
    kv_tag = headers.get(KV_TAG_HEADER)
    if kv_tag is not None:
        bucket = stream.removeprefix("KV_")
        key = subject.removeprefix(f"$KV.{bucket}.")
        forms = [(bucket, key, seq), (stream, subject, seq)]
        if MSG_ID_HEADER in headers:
            forms.append((stream, headers[MSG_ID_HEADER], 0))
        if any(barrier.verify_kv(a, b, n, data, kv_tag) for a, b, n in forms):
            tagged.append(f"{where} entry tag (kv form)")
    return opened, tagged


async def key_traces(nc: NATS, keys: Sequence[XKey]) -> list[KeyTraces]:
    """Read every message of every stream on the server once; for each key, what it opens
    or tags. Every stream: the event log, the anchor, the access log, both KV buckets
    (their whole history), any staging stream, and whatever else is there."""
    barriers = [Barrier(key) for key in keys]
    results = [KeyTraces() for _ in keys]
    for info in await nc.jetstream().streams_info():
        stream = info.config.name
        assert stream is not None
        async for raw in read_stream(nc, stream, ">"):
            subject = raw.headers.get(SUBJECT_HEADER, "")
            for barrier, result in zip(barriers, results, strict=True):
                result.messages += 1
                opened, tagged = traces_in(barrier, stream, raw.seq, subject, raw.data, raw.headers)
                result.opened += opened
                result.tagged += tagged
    return results
