"""`python -m bench.bench_get [--quick] [--profile]`: how fast `get` is, against same-run floors.

Absolute numbers depend on the machine, so every figure is set against two references
measured in the same run, on the same nats-server, under the same load generator:

- the echo floor: a bare nats-py responder answering get-shaped traffic with a reply
  the size of a sealed get reply (the least any Python responder can cost);
- the direct-KV baseline: the original's algorithm in Python, two KV reads per get
  (mapping from the state bucket, value from the secrets bucket) plus the same crypto.

Then ours: `secrets-nats-kv run` as a real process, with 1 and with N workers. Beyond
gets it measures puts (sequential and concurrent), memory per 100 000 secrets and the
cold start of a backend whose log holds 100 000 events. It prints a table with PASS/MISS
against the project's targets and writes everything to `bench/results/get.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.load import (
    EchoWorkload,
    GetWorkload,
    LoadResult,
    LoadSpec,
    Workload,
    machine_busy_seconds,
    proc_rss_bytes,
    run_load,
    secret_value,
    sum_cpu,
)
from events.log import EventLog, stream_name
from events.types import Event, MappingAdded, SecretPut, encode_event
from projections.kv import KvLayout, KvViews
from projections.state import ViewState, fold
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.config import KIND_HEADER, BackendNames, kv_stream
from secrets_nats_kv.errors import InvalidEntityJWT, InvalidJWT, ProtocolError, Unauthorized
from secrets_nats_kv.jwt import _verified, verify_entity_jwt, verify_host_jwt
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.wire import RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import SealBox, XKey
from tests.support.tokens import mint_component_jwt, mint_host_jwt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
_SPAWN = multiprocessing.get_context("spawn")
_PIDS_STARTED: set[int] = set()  # the `run` processes this bench started (own sessions)
QUEUEING_MS = 100.0  # a fixed-rate p50 above this is time spent queued, not serving


# --- scale -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How big one run is; the default fits in < 5 minutes on 2 cores, `--quick` in ~1."""

    secrets: int = 10_000
    entities: int = 1_000
    hosts: int = 20
    cold_events: int = 100_000
    warmup_s: float = 2.0
    measure_s: float = 5.0
    rates: tuple[float, ...] = (200.0, 1000.0)
    get_bank: int = 30_000  # sealed gets prepared for one saturation run (all processes)
    echo_bank: int = 600_000
    concurrency: int = 64  # outstanding requests per generator process at saturation
    verify_every: int = 25  # at saturation; open-loop runs open every reply
    puts_sequential: int = 400
    puts_concurrent: int = 1_500
    put_concurrency: int = 16
    put_time_s: float = 6.0


DEFAULT = Scale()
QUICK = Scale(
    secrets=2_000,
    entities=200,
    hosts=10,
    cold_events=10_000,
    warmup_s=0.5,
    measure_s=2.0,
    rates=(200.0, 500.0),
    get_bank=8_000,
    echo_bank=150_000,
    concurrency=32,
    puts_sequential=100,
    puts_concurrent=300,
    put_time_s=2.0,
)


# --- identities and data -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Backend keys, an account, entities with their component JWTs and secrets, host JWTs."""

    transit: XKey
    encryption: XKey
    account: SigningKey
    entities: tuple[tuple[str, str, tuple[str, ...]], ...]  # (public key, JWT, secret names)
    host_jwts: tuple[str, ...]

    @classmethod
    def make(cls, secrets: int, entities: int, hosts: int) -> Dataset:
        account = SigningKey.generate(Role.ACCOUNT)
        per_entity = max(1, secrets // entities)
        rows = []
        for i in range(entities):
            module = SigningKey.generate(Role.MODULE)
            names = tuple(
                secret_name(j) for j in range(i * per_entity, min(secrets, (i + 1) * per_entity))
            )
            jwt = mint_component_jwt(account, module.public_key, name=f"component-{i}")
            rows.append((module.public_key, jwt, names))
        host_jwts = tuple(
            mint_host_jwt(account, SigningKey.generate(Role.SERVER).public_key, name=f"host-{h}")
            for h in range(hosts)
        )
        return cls(XKey.generate(), XKey.generate(), account, tuple(rows), host_jwts)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
        env["PYTHONPATH"] = str(REPO)
        env["TRANSIT_XKEY_SEED"] = self.transit.seed
        env["ENCRYPTION_XKEY_SEED"] = self.encryption.seed
        return env

    def workload(self, names: BackendNames) -> GetWorkload:
        return GetWorkload(
            subject_prefix=names.subject_prefix,
            entities=tuple((jwt, secrets) for _, jwt, secrets in self.entities),
            host_jwts=self.host_jwts,
        )

    def secret_names(self) -> list[str]:
        return [name for _, _, names in self.entities for name in names]


def secret_name(index: int) -> str:
    return f"bench-secret-{index:06d}"


def get_sizes(data: Dataset, secrets: int) -> tuple[int, int]:
    """Bytes of a real sealed get request and of a real sealed get reply."""
    _, jwt, names = data.entities[-1]
    body = wire.encode_secret_request(
        wire.SecretRequest(
            key=names[-1],
            context=wire.Context(jwt, data.host_jwts[0], wire.Application(name="bench-app")),
        )
    )
    request = len(XKey.generate().seal(body, data.transit))
    reply_body = wire.encode_secret_response(
        wire.Secret.of_string(str(secrets), secret_value(names[-1]))
    )
    return request, len(XKey.generate().seal(reply_body, data.transit))


def event_provenance(admin: XKey) -> dict[str, Any]:
    return {
        "at": time.time(),
        "admin_key": admin.public_key,
        "authenticated": True,
        "request_id": uuid.uuid4().hex,
    }


def dataset_events(data: Dataset) -> Iterator[Event]:
    """The log a backend would have after putting every secret and adding every mapping."""
    at_rest = SealBox(data.encryption, data.encryption)
    for name in data.secret_names():
        yield SecretPut(
            name=name,
            sealed=at_rest.seal(secret_value(name).encode()),
            **event_provenance(data.transit),
        )
    for entity, _, names in data.entities:
        yield MappingAdded(entity=entity, secrets=names, **event_provenance(data.transit))


def put_events(encryption: XKey, admin: XKey, count: int, prefix: str) -> Iterator[SecretPut]:
    at_rest = SealBox(encryption, encryption)
    for i in range(count):
        name = f"{prefix}-{i:06d}"
        yield SecretPut(
            name=name, sealed=at_rest.seal(secret_value(name).encode()), **event_provenance(admin)
        )


# --- writing a log (and its KV view) fast ----------------------------------------------------


async def publish_pipelined(
    nc: NATS, items: Iterable[tuple[str, bytes, dict[str, str]]], *, window: int = 2048
) -> int:
    """JetStream publishes with up to `window` acks outstanding, in order, all checked.

    One task publishes on one connection, so the server sees them in order and every
    `Nats-Expected-Last-Sequence` holds; a failed ack fails the setup.
    """
    inbox = nc.new_inbox()
    acked = 0
    failures: list[bytes] = []
    progress = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        nonlocal acked
        acked += 1
        if b'"error"' in msg.data:
            failures.append(msg.data[:300])
        progress.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    sent = 0
    try:
        for subject, body, headers in items:
            await nc.publish(subject, body, reply=f"{inbox}.{sent}", headers=headers)
            sent += 1
            while sent - acked > window and not failures:
                progress.clear()
                await asyncio.wait_for(progress.wait(), 30)
            if failures:
                break
        while acked < sent and not failures:
            progress.clear()
            await asyncio.wait_for(progress.wait(), 30)
    finally:
        await sub.unsubscribe()
    if failures:
        raise RuntimeError(f"setup publish failed: {failures[0]!r}")
    return sent


async def write_log(
    url: str,
    names: BackendNames,
    encryption: XKey,
    events: Iterable[Event],
    *,
    write_kv: bool,
) -> int:
    """Append `events` to the backend's log (tagged as its appender tags them) and, if
    `write_kv`, write the secrets bucket exactly as its KV writer would (a restart then
    finds its views current)."""
    nc = await nats.connect(url, name="bench setup", pending_size=256 * 1024 * 1024)
    try:
        log = EventLog(nc, backend_name=names.name, barrier=Barrier(encryption))
        await log.ensure()
        layout = KvLayout(names.secrets_bucket, names.state_bucket)
        await KvViews(nc, layout).ensure()
        first = (await log.state()).last_seq + 1
        previous = GENESIS
        if first > 1:  # appending: follow the chain where the log ends
            async for entry in log.entries():
                previous = entry.link or previous
        puts: list[SecretPut] = []

        def entries() -> Iterator[tuple[str, bytes, dict[str, str]]]:
            nonlocal previous
            for offset, event in enumerate(events):
                seq = first + offset
                encoded = log.encode(event, seq, previous)  # as the appender encodes it
                previous = encoded.link
                if isinstance(event, SecretPut):
                    puts.append(event)
                headers = {"Nats-Expected-Last-Sequence": str(seq - 1), **encoded.headers}
                yield log.subject_for(event), encoded.body, headers

        count = await publish_pipelined(nc, entries())
        if write_kv:
            last = (await stream_state(nc, kv_stream(names.secrets_bucket), 5)).last_seq
            await publish_pipelined(
                nc,
                (
                    (
                        f"$KV.{names.secrets_bucket}.{put.name}",
                        put.sealed,
                        {KIND_HEADER: put.kind, "Nats-Expected-Last-Sequence": str(rev - 1)},
                    )
                    for rev, put in enumerate(puts, start=last + 1)
                ),
            )
        return count
    finally:
        await nc.close()


async def wait_kv(
    url: str, names: BackendNames, secrets: int, mappings: int, limit: float
) -> float:
    """Wait (bounded) until a backend's KV writer has written both buckets; seconds taken."""
    nc = await nats.connect(url, name="bench kv wait")
    started = time.monotonic()
    try:
        while True:
            s = await stream_state(nc, kv_stream(names.secrets_bucket), 5)
            m = await stream_state(nc, kv_stream(names.state_bucket), 5)
            if s.last_seq >= secrets and m.last_seq >= mappings:
                return time.monotonic() - started
            if time.monotonic() - started > limit:
                raise TimeoutError(f"KV view at {s.last_seq}/{m.last_seq} after {limit:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


# --- the responders under test ----------------------------------------------------------------


class Responder:
    """Something answering gets, with the pids whose CPU counts as its cost."""

    label: str

    def pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        raise NotImplementedError


class SpawnedResponder(Responder):
    """A responder function in a spawned process, stopped through its pipe."""

    def __init__(self, label: str, target: Callable[..., None], *args: Any) -> None:
        self.label = label
        parent, child = _SPAWN.Pipe()
        self._conn = parent
        self._process = _SPAWN.Process(target=target, args=(child, *args), daemon=True)
        self._process.start()
        child.close()
        if not parent.poll(60):
            self._process.terminate()
            raise TimeoutError(f"{label} did not start")
        message = parent.recv()
        if message != "ready":
            raise RuntimeError(f"{label}: {message}")

    def pids(self) -> list[int]:
        return [self._process.pid] if self._process.pid is not None else []

    def stop(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
            if self._conn.poll(10):
                info = self._conn.recv()
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()
        return info


def serve_echo(
    conn: multiprocessing.connection.Connection, url: str, names: BackendNames, reply_size: int
) -> None:
    """The floor: a bare nats-py queue subscriber replying with a reply-sized blob."""

    async def main() -> None:
        nc = await nats.connect(url, name="bench echo", pending_size=64 * 1024 * 1024)
        blob = os.urandom(reply_size)
        headers = {RESPONSE_XKEY_HEADER: XKey.generate().public_key}

        async def handle(msg: Msg) -> None:
            await nc.publish(msg.reply, blob, headers=headers)

        async def server_xkey(msg: Msg) -> None:  # only for the drain probe between runs
            await nc.publish(msg.reply, headers[RESPONSE_XKEY_HEADER].encode())

        await nc.subscribe(names.subject("get"), queue=names.queue_group, cb=handle)
        await nc.subscribe(names.subject("server_xkey"), queue=names.queue_group, cb=server_xkey)
        await nc.flush()
        await _serve_until_stopped(conn, nc, {})

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def serve_direct_kv(
    conn: multiprocessing.connection.Connection,
    url: str,
    names: BackendNames,
    transit_seed: str,
    encryption_seed: str,
    trusted_issuer: str,
) -> None:
    """The original's algorithm in Python: per get, read the mapping from the state bucket
    and the value from the secrets bucket (PROTOCOL §6), with the same crypto as ours."""

    async def main() -> None:
        nc = await nats.connect(url, name="bench direct-kv", pending_size=64 * 1024 * 1024)
        js = nc.jetstream(timeout=5)
        state_kv = await js.key_value(names.state_bucket)
        secrets_kv = await js.key_value(names.secrets_bucket)
        transit = XKey.from_seed(transit_seed)
        at_rest = SealBox(XKey.from_seed(encryption_seed), XKey.from_seed(encryption_seed))
        slots = asyncio.Semaphore(256)  # as many gets in flight as our pool has workers
        tasks: set[asyncio.Task[None]] = set()

        async def answer(msg: Msg) -> None:
            try:
                reply = await direct_kv_get(
                    msg, transit, at_rest, state_kv, secrets_kv, trusted_issuer
                )
                headers: dict[str, str] | None = reply[1]
                data = reply[0]
            except ProtocolError as exc:
                data, headers = wire.encode_error_response(exc), None
            await nc.publish(msg.reply, data, headers=headers)

        async def handle(msg: Msg) -> None:
            await slots.acquire()  # backpressure on the subscription, like the pool's buffer
            task = asyncio.create_task(answer(msg))
            tasks.add(task)
            task.add_done_callback(finished)

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slots.release()

        async def server_xkey(msg: Msg) -> None:
            await nc.publish(msg.reply, transit.public_key.encode())

        await nc.subscribe(names.subject("get"), queue=names.queue_group, cb=handle)
        await nc.subscribe(names.subject("server_xkey"), queue=names.queue_group, cb=server_xkey)
        await nc.flush()
        cache = _verified.cache_info()
        await _serve_until_stopped(conn, nc, {"before": cache})

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def direct_kv_get(
    msg: Msg, transit: XKey, at_rest: SealBox, state_kv: Any, secrets_kv: Any, trusted: str
) -> tuple[bytes, dict[str, str]]:
    """One get the original's way; raises the protocol error it answers with."""
    from actors.admin import sender_key  # the same header checks as ours

    host_key = sender_key(msg.headers, msg.data)
    request = wire.decode_secret_request(transit.open(msg.data, host_key))
    try:
        entity = verify_entity_jwt(request.context.entity_jwt)
        host = verify_host_jwt(request.context.host_jwt)
    except InvalidJWT as exc:
        raise InvalidEntityJWT(exc.reason) from None
    if trusted not in (entity.iss, host.iss):
        raise InvalidEntityJWT("untrusted issuer")
    try:
        mapping = await state_kv.get(entity.sub)
    except Exception:
        raise Unauthorized(f"{entity.sub} has no mapping") from None
    if request.key not in msgspec.json.decode(mapping.value or b"[]"):
        raise Unauthorized(f"{entity.sub} is not mapped to {request.key}")
    entry = await secrets_kv.get(request.key, revision=request.requested_revision())
    value = at_rest.open(entry.value)
    body = wire.encode_secret_response(wire.Secret.of_string(str(entry.revision), value.decode()))
    reply_key = XKey.generate()
    return reply_key.seal(body, host_key), {RESPONSE_XKEY_HEADER: reply_key.public_key}


async def _serve_until_stopped(
    conn: multiprocessing.connection.Connection, nc: NATS, info: dict[str, Any]
) -> None:
    conn.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    before = info.get("before")
    after = _verified.cache_info()
    if before is not None:
        info = {"jwt_cache_hits": after.hits - before.hits, "jwt_cache_misses": after.misses}
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)  # not drain: a backlog would hold it for long
    conn.send(info)


class OursResponder(Responder):
    """`secrets-nats-kv run` as a real process (its own session: Ctrl-C reaches us, and we
    stop it in order)."""

    def __init__(
        self,
        label: str,
        url: str,
        names: BackendNames,
        env: dict[str, str],
        log_dir: Path,
        *,
        workers: int = 1,
        extra: tuple[str, ...] = (),
        ready_limit: float = 120.0,
    ) -> None:
        self.label = label
        self.names = names
        command = [
            sys.executable,
            "-m",
            "secrets_nats_kv.app.cli",
            "run",
            "--nats-address",
            url,
            "--name",
            names.name,
            "-b",
            names.secrets_bucket,
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            *extra,
        ]
        log = (log_dir / f"{label}.log").open("ab")
        started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _PIDS_STARTED.add(self.process.pid)
        try:
            self.ready_s = asyncio.run(self._wait_ready(url, workers, started, ready_limit))
        except BaseException:
            self.stop()
            raise
        self._pids = [self.process.pid, *children_of(self.process.pid)]

    async def _wait_ready(self, url: str, workers: int, started: float, limit: float) -> float:
        """Seconds from spawn until it answers `server_xkey`, then until `workers` instances
        answer `$SRV.PING` (the service registers only once its view has caught up)."""
        nc = await nats.connect(url, name="bench ready probe")
        try:
            subject = self.names.subject("server_xkey")
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.label} exited with {self.process.returncode}")
                if time.monotonic() - started > limit:
                    raise TimeoutError(f"{self.label} not ready after {limit:.0f}s")
                try:
                    msg = await nc.request(subject, b"", timeout=0.2)
                    if msg.data.startswith(b"X"):
                        break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await asyncio.sleep(0.01)
            ready = time.monotonic() - started
            while await self._instances(nc) < workers:
                if time.monotonic() - started > limit:
                    raise TimeoutError(f"{self.label}: not all {workers} workers ready")
            return ready
        finally:
            await nc.close()

    async def _instances(self, nc: NATS) -> int:
        seen: set[str] = set()
        inbox = nc.new_inbox()

        async def pong(msg: Msg) -> None:
            info = json.loads(msg.data)
            if info.get("metadata", {}).get("backend") == self.names.name:
                seen.add(info.get("id", ""))

        sub = await nc.subscribe(inbox, cb=pong)
        await nc.publish("$SRV.PING.secrets-nats-kv", b"", reply=inbox)
        await asyncio.sleep(0.3)
        await sub.unsubscribe()
        return len(seen)

    def pids(self) -> list[int]:
        return self._pids

    def rss(self) -> int:
        return sum(proc_rss_bytes(pid) for pid in self._pids)

    def stop(self) -> dict[str, Any]:
        stop_process_group(self.process)
        return {}


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (the `--workers` children of a `run` process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry))
    return found


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the backend drains and stops its workers), SIGKILL its group if it hangs."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # leftover workers of that group, if any
    _PIDS_STARTED.discard(process.pid)


# --- measuring ---------------------------------------------------------------------------------


class SubjectCounter:
    """Counts messages on a subject from a thread of its own, e.g. the `STREAM.INFO`
    requests behind `wait_fresh`: a plain subscriber gets a copy of every request."""

    def __init__(self, url: str, subject: str) -> None:
        self.count = 0
        self._url = url
        self._subject = subject
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bench counter", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError(f"could not subscribe to {subject}")

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(self._url, name="bench counter", allow_reconnect=False)

        async def seen(msg: Msg) -> None:
            self.count += 1

        await nc.subscribe(self._subject, cb=seen)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class Measured:
    """Saturation and fixed-rate runs of one responder."""

    label: str
    saturation: LoadResult
    rates: dict[float, LoadResult]
    server_cpu_s: float
    nats_cpu_s: float

    @staticmethod
    def foreign_cores(result: LoadResult) -> float:
        """Cores busy during the window with processes outside the benchmark."""
        ours = result.sampled.get("server", 0.0) + result.sampled.get("nats", 0.0)
        other = result.sampled.get("machine", 0.0) - ours - result.generator_cpu_s
        return max(0.0, other) / result.window_s

    @property
    def throughput(self) -> float:
        return self.saturation.throughput

    @property
    def cpu_per_get_us(self) -> float:
        n = self.saturation.in_window
        return self.server_cpu_s / n * 1e6 if n else math.nan

    @property
    def nats_per_get_us(self) -> float:
        n = self.saturation.in_window
        return self.nats_cpu_s / n * 1e6 if n else math.nan

    @property
    def per_core(self) -> float:
        """Gets per CPU-second of the responder's own processes."""
        return self.saturation.in_window / self.server_cpu_s if self.server_cpu_s else math.nan

    @property
    def cores_busy(self) -> float:
        return self.server_cpu_s / self.saturation.window_s

    def summary(self) -> dict[str, Any]:
        sat = self.saturation
        return {
            "gets_per_s": round(self.throughput, 1),
            "gets_in_window": sat.in_window,
            "window_s": round(sat.window_s, 3),
            "generator_procs": sat.procs,
            "outstanding": sat.procs * sat.spec.concurrency,
            "p50_ms_at_saturation": round(sat.percentile_ms(50), 3),
            "p99_ms_at_saturation": round(sat.percentile_ms(99), 3),
            "server_cpu_us_per_get": round(self.cpu_per_get_us, 1),
            "server_cores_busy": round(self.cores_busy, 2),
            "gets_per_server_cpu_s": round(self.per_core, 1),
            "nats_server_cpu_us_per_get": round(self.nats_per_get_us, 1),
            "stream_info_per_get": round(
                sat.sampled.get("head_reads", 0.0) / max(1, sat.in_window), 3
            ),
            "generator_cpu_us_per_get": round(sat.generator_cpu_s / max(1, sat.in_window) * 1e6, 1),
            "bank_exhausted": sat.exhausted,
            "foreign_cores_busy": round(self.foreign_cores(sat), 2),
            "errors": sat.errors,
            "verified_replies": sum(w.verified for w in sat.workers),
            "fixed_rate": {
                str(int(rate)): {
                    "offered_per_s": rate,
                    "answered_in_window": result.in_window,
                    "p50_ms": round(result.percentile_ms(50), 3),
                    "p99_ms": round(result.percentile_ms(99), 3),
                    "generator_late_p99_ms": round(result.lateness_ms(99), 3),
                    "queueing": result.percentile_ms(50) > QUEUEING_MS,
                    "foreign_cores_busy": round(self.foreign_cores(result), 2),
                    "errors": result.errors,
                    "verified_replies": sum(w.verified for w in result.workers),
                }
                for rate, result in self.rates.items()
            },
        }


class Bench:
    """One run: the nats-server, the scale, and what has been measured so far."""

    def __init__(
        self, scale: Scale, server: NatsServer, gen_procs: int, log_dir: Path, names: BackendNames
    ) -> None:
        self.head_reads = SubjectCounter(
            server.url, f"$JS.API.STREAM.INFO.{stream_name(names.name)}"
        )
        self.names = names
        self.scale = scale
        self.get_bank = scale.get_bank  # sealed gets per saturation run; resized once measured
        self.server = server
        self.url = server.url
        self.gen_procs = gen_procs
        self.log_dir = log_dir

    def say(self, text: str) -> None:
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        sys.stderr.flush()

    def load(
        self,
        workload: Workload,
        responder: Responder,
        *,
        mode: str,
        procs: int,
        bank: int,
        rate: float = 0.0,
        verify_every: int = 1,
        seed: int = 0,
        on_window: Callable[[], None] | None = None,
    ) -> LoadResult:
        scale = self.scale
        spec = LoadSpec(
            url=self.url,
            mode="closed" if mode == "closed" else "open",
            warmup_s=scale.warmup_s,
            measure_s=scale.measure_s,
            requests_per_proc=max(1, math.ceil(bank / procs)),
            concurrency=scale.concurrency,
            rate=rate,
            verify_every=verify_every,
            seed=seed,
        )
        pids = responder.pids()
        nats_pid = self.server.pid or 0

        def sample() -> dict[str, float]:
            return {
                "server": sum_cpu(pids),
                "nats": sum_cpu([nats_pid]),
                "machine": machine_busy_seconds(),
                "head_reads": float(self.head_reads.count),
            }

        result = run_load(spec, workload, procs, sample=sample, on_window=on_window)
        self.drain(responder)
        return result

    def drain(self, responder: Responder) -> None:
        """Wait until requests still queued at the responder (an overloaded open-loop run
        leaves some) are answered, so the next run starts clean: a `server_xkey` request
        queues behind them."""
        subject = f"{self.names.subject_prefix}.server_xkey"

        async def probe() -> None:
            nc = await nats.connect(self.url, name="bench drain")
            try:
                await nc.request(subject, b"", timeout=60)
            finally:
                await nc.close()

        try:
            asyncio.run(probe())
        except nats.errors.Error as exc:
            self.say(f"{responder.label}: drain probe failed ({type(exc).__name__})")

    def measure(
        self, responder: Responder, workload: Workload, *, procs: int | None = None, seed: int = 0
    ) -> Measured:
        scale = self.scale
        procs = procs or self.gen_procs
        is_echo = isinstance(workload, EchoWorkload)
        self.say(f"{responder.label}: saturation ({procs} generator processes)")
        saturation = self.load(
            workload,
            responder,
            mode="closed",
            procs=procs,
            bank=scale.echo_bank if is_echo else self.get_bank,
            verify_every=scale.verify_every,
            seed=seed,
        )
        rates = {}
        for rate in scale.rates:
            self.say(f"{responder.label}: {rate:.0f}/s offered (open loop)")
            bank = math.ceil(rate * (scale.warmup_s + scale.measure_s)) + 10
            rates[rate] = self.load(
                workload, responder, mode="open", procs=1, bank=bank, rate=rate, seed=seed + 1
            )
        return Measured(
            responder.label,
            saturation,
            rates,
            saturation.sampled.get("server", 0.0),
            saturation.sampled.get("nats", 0.0),
        )


# --- puts ---------------------------------------------------------------------------------------


async def measure_puts(url: str, names: BackendNames, admin: XKey, scale: Scale) -> dict[str, Any]:
    """Sequential puts (one admin, one at a time) and concurrent puts (several admins)."""
    nc = await nats.connect(url, name="bench puts")
    try:
        client = AdminClient(nc, names, admin, timeout=10)
        await client.server_xkey()
        latencies: list[float] = []
        started = time.monotonic()
        for i in range(scale.puts_sequential):
            if time.monotonic() - started > scale.put_time_s:
                break
            t0 = time.perf_counter()
            name = f"bench-put-seq-{i:06d}"
            await client.put_secret(name, secret_value(name))
            latencies.append(time.perf_counter() - t0)
        sequential_s = time.monotonic() - started

        done = 0
        failures: dict[str, int] = {}
        next_index = 0
        deadline = time.monotonic() + scale.put_time_s

        async def writer() -> None:
            nonlocal done, next_index
            own = AdminClient(nc, names, admin, timeout=10)
            while next_index < scale.puts_concurrent and time.monotonic() < deadline:
                name = f"bench-put-conc-{next_index:06d}"
                next_index += 1
                try:
                    await own.put_secret(name, secret_value(name))
                    done += 1
                except Exception as exc:
                    key = f"{type(exc).__name__}: {exc}"[:80]
                    failures[key] = failures.get(key, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(writer() for _ in range(scale.put_concurrency)))
        concurrent_s = time.monotonic() - started
    finally:
        await nc.close()
    latencies.sort()
    return {
        "sequential": {
            "puts": len(latencies),
            "puts_per_s": round(len(latencies) / sequential_s, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None,
        },
        "concurrent": {
            "writers": scale.put_concurrency,
            "puts": done,
            "puts_per_s": round(done / concurrent_s, 1),
            "failures": failures,
        },
    }


# --- memory and cold start ----------------------------------------------------------------------


def fold_memory(count: int, encryption: XKey) -> dict[str, Any]:
    """Bytes a ViewState keeps for `count` secrets, folded from encoded events in-process
    (tracemalloc: only what the projection retains, not allocator high-water)."""
    bodies = [encode_event(e) for e in put_events(encryption, encryption, count, "mem")]
    from events.types import decode_event

    gc.collect()
    tracemalloc.start()
    state = ViewState()
    for seq, body in enumerate(bodies, start=1):
        fold(state, seq, decode_event(body))
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(state.secrets) == count
    return {
        "secrets": count,
        "retained_bytes": current,
        "per_secret_bytes": round(current / count, 1),
        "per_100k_mib": round(current / count * 100_000 / 2**20, 1),
        "peak_bytes": peak,
    }


def measure_cold_start(bench: Bench, data: Dataset) -> dict[str, Any]:
    """Ready time and RSS of a backend with an empty log, and with `cold_events` puts."""
    env = data.env()
    out: dict[str, Any] = {}
    empty = BackendNames(name="bench-empty", secrets_bucket="BENCH_EMPTY")
    bench.say("cold start: empty log")
    ours = OursResponder(
        "cold-empty", bench.url, empty, env, bench.log_dir, extra=("--no-access-log",)
    )
    time.sleep(0.5)
    empty_rss = ours.rss()
    ours.stop()
    out["empty"] = {"ready_s": round(ours.ready_s, 3), "rss_mib": round(empty_rss / 2**20, 1)}

    count = bench.scale.cold_events
    cold = BackendNames(name="bench-cold", secrets_bucket="BENCH_COLD")
    bench.say(f"cold start: writing {count} events and their KV view")
    started = time.monotonic()
    asyncio.run(
        write_log(
            bench.url,
            cold,
            data.encryption,
            put_events(data.encryption, data.transit, count, "cold"),
            write_kv=True,
        )
    )
    out["setup_s"] = round(time.monotonic() - started, 2)
    bench.say(f"cold start: {count} events")
    ours = OursResponder(
        "cold-full", bench.url, cold, env, bench.log_dir, extra=("--no-access-log",)
    )
    time.sleep(0.5)
    full_rss = ours.rss()
    ours.stop()
    delta = full_rss - empty_rss
    out["full"] = {
        "events": count,
        "ready_s": round(ours.ready_s, 3),
        "rss_mib": round(full_rss / 2**20, 1),
        "rss_delta_per_100k_mib": round(delta / count * 100_000 / 2**20, 1),
    }
    return out


# --- profile ------------------------------------------------------------------------------------


def measure_crypto_floor(
    transit: XKey, request_size: int, reply_size: int, count: int, rounds: int = 5
) -> dict[str, Any]:
    """CPU the protocol itself costs per get, timed in this process with nothing around it.

    PROTOCOL §3 fixes three Curve25519 operations per get: open a request sealed by the
    host's fresh key, make the backend's own fresh reply key, seal the reply to the host.
    No plumbing goes below this, so it bounds every throughput target from above. The
    least of `rounds` rounds is kept: a round can only be slowed down by the machine.
    """
    overhead = len(b"xkv1") + 24 + 16  # header, nonce, MAC
    request_body = os.urandom(max(1, request_size - overhead))
    reply_body = os.urandom(max(1, reply_size - overhead))
    per_round = max(1, count // rounds)
    timings = []
    for _ in range(rounds):
        hosts = [XKey.generate() for _ in range(per_round)]  # the hosts' work, not timed
        sealed = [(host.public_key, host.seal(request_body, transit)) for host in hosts]
        gc.disable()  # the bench's own large heap is not the protocol's cost
        try:
            started = time.process_time()
            for host_public, message in sealed:
                host_key = XKey.from_public(host_public)
                transit.open(message, host_key)
                reply_key = XKey.generate()
                reply_key.seal(reply_body, host_key)
            timings.append((time.process_time() - started) / per_round * 1e6)
        finally:
            gc.enable()
    return {
        "count": per_round * rounds,
        "cpu_us_per_get": round(min(timings), 1),
        "rounds_us": [round(t, 1) for t in timings],
    }


def find_py_spy(given: str | None) -> str | None:
    for candidate in (
        given,
        os.environ.get("PY_SPY"),
        shutil.which("py-spy"),
        "/tmp/prof/bin/py-spy",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def profile_ours(
    bench: Bench, ours: OursResponder, workload: GetWorkload, py_spy: str
) -> dict[str, Any]:
    """py-spy (non-blocking sampling, so it does not pause the target) on the `run`
    process over the measurement window of an extra saturation run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "get-profile.txt"
    raw.unlink(missing_ok=True)
    duration = max(1, math.floor(bench.scale.measure_s))
    command = [py_spy, "record", "--pid", str(ours.process.pid), "--duration", str(duration)]
    command += ["--rate", "250", "--nonblocking", "--gil", "--function", "--format", "raw"]
    command += ["--output", str(raw)]
    spies: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    try:
        result = bench.load(
            workload,
            ours,
            mode="closed",
            procs=bench.gen_procs,
            bank=bench.get_bank,
            verify_every=bench.scale.verify_every,
            seed=7,
            on_window=start,
        )
        err = spies[0].communicate(timeout=duration + 60)[1] if spies else b"not started"
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
    if not raw.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    summary = summarize_profile(raw.read_text())
    summary["gets_per_s_while_profiled"] = round(result.throughput, 1)
    summary["raw"] = str(raw.relative_to(REPO))
    return summary


def summarize_profile(collapsed: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per frame from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(frame, round(100 * n / total, 1)) for frame, n in best]

    return {"samples": total, "self_pct": ranked(own), "inclusive_pct": ranked(inclusive)}


def _short(frame: str) -> str:
    """`func (path/to/file.py:12)` with the path cut to its package-relative tail."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# --- report -------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    lines: list[str] = []
    gets = results["gets"]
    echo = gets["echo"]
    rates = [str(int(r)) for r in results["scale"]["rates"]]
    head = f"{'responder':<14}{'gets/s':>9}{'x echo':>8}{'p50/p99 sat ms':>16}"
    for rate in rates:
        head += f"{'p50/p99 @' + rate + '/s':>18}"
    head += f"{'cpu us/get':>11}{'cores':>7}{'nats us/get':>12}  errors"
    lines += [head, "-" * len(head)]
    for label, row in gets.items():
        line = (
            f"{label:<14}{row['gets_per_s']:>9.0f}{row['gets_per_s'] / echo['gets_per_s']:>8.2f}"
            f"{_pair(row['p50_ms_at_saturation'], row['p99_ms_at_saturation']):>16}"
        )
        for rate in rates:
            fixed = row["fixed_rate"][rate]
            mark = "*" if fixed["queueing"] else ""
            line += f"{_pair(fixed['p50_ms'], fixed['p99_ms']) + mark:>18}"
        errors = dict(row["errors"])
        for fixed in row["fixed_rate"].values():
            for key, n in fixed["errors"].items():
                errors[key] = errors.get(key, 0) + n
        line += (
            f"{row['server_cpu_us_per_get']:>11.0f}{row['server_cores_busy']:>7.2f}"
            f"{row['nats_server_cpu_us_per_get']:>12.0f}  {_errors(errors)}"
        )
        lines.append(line)
    heads = ", ".join(
        f"{label} {row['stream_info_per_get']:.3f}"
        for label, row in gets.items()
        if row["stream_info_per_get"]
    )
    foreign = max(row["foreign_cores_busy"] for row in gets.values())
    lines.append(
        f"* p50 above {QUEUEING_MS:.0f} ms: the offered load exceeded what the responder "
        "served then, so latency is queueing"
    )
    lines.append(f"head reads (STREAM.INFO) per get at saturation: {heads or 'none'}")
    lines.append(
        f"cores busy with processes outside the benchmark: up to {foreign:.2f} of "
        f"{results['machine']['cpus']} during a saturation window"
        + ("  (!) a shared machine: absolute numbers are low" if foreign > 0.25 else "")
    )
    gen = results["generator"]
    lines.append("")
    lines.append(
        "generator ceiling (echo floor): "
        + ", ".join(f"{k} procs {v['gets_per_s']:.0f}/s" for k, v in gen["echo_by_procs"].items())
        + f"; {gen['cpu_us_per_get']:.0f} us generator CPU per get of ours"
        + f" (requests prepared before the window: {gen['prepare_us_per_get']:.0f} us each)"
    )
    crypto = results.get("crypto_floor")
    if crypto:
        lines.append(
            f"crypto floor: {crypto['cpu_us_per_get']:.0f} us CPU a get for the protocol's "
            "open + fresh reply key + seal (in-process, nothing else)"
        )
    puts = results.get("puts")
    if puts:
        seq, conc = puts["sequential"], puts["concurrent"]
        lines.append(
            f"puts: sequential {seq['puts_per_s']:.0f}/s (p50 {seq['p50_ms']} ms, "
            f"p99 {seq['p99_ms']} ms, n={seq['puts']}); concurrent x{conc['writers']} "
            f"{conc['puts_per_s']:.0f}/s (n={conc['puts']}, failures {_errors(conc['failures'])})"
        )
    memory = results.get("memory")
    if memory:
        fold_ = memory["fold"]
        lines.append(
            f"memory: ViewState retains {fold_['per_100k_mib']} MiB per 100k secrets "
            f"({fold_['per_secret_bytes']:.0f} B/secret, tracemalloc); backend RSS "
            f"+{memory['cold']['full']['rss_delta_per_100k_mib']} MiB per 100k secrets"
        )
        cold = memory["cold"]
        lines.append(
            f"cold start: empty log {cold['empty']['ready_s']:.2f} s, "
            f"{cold['full']['events']} events {cold['full']['ready_s']:.2f} s to first "
            f"server_xkey reply (RSS {cold['empty']['rss_mib']} -> {cold['full']['rss_mib']} MiB)"
        )
    lines.append("")
    for target in results["targets"]:
        lines.append(f"{target['verdict']}  {target['name']}: {target['measured']}")
    return "\n".join(lines)


def _pair(a: float, b: float) -> str:
    return f"{a:.2f}/{b:.2f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in errors.items()) or "none"


def targets(gets: dict[str, Any], low_rate: str, crypto_us: float) -> list[dict[str, Any]]:
    """The project's three targets, each with the best the protocol's crypto would allow.

    A get costs at least the echo floor's CPU plus `crypto_us` (measured in the same run),
    so per core ours can reach at most echo / (echo + crypto) of the echo floor, and at
    most direct-KV / (echo + crypto) times direct-KV's throughput per CPU-second.
    """
    echo, ours, direct = gets["echo"], gets["ours-1"], gets["direct-kv"]
    echo_us = 1e6 / echo["gets_per_server_cpu_s"]
    direct_us = 1e6 / direct["gets_per_server_cpu_s"]
    least_us = echo_us + crypto_us  # a responder doing nothing but transport and crypto
    ceiling_per_core = echo_us / least_us
    ceiling_vs_direct = direct_us / least_us
    per_core = ours["gets_per_server_cpu_s"] / echo["gets_per_server_cpu_s"]
    raw = ours["gets_per_s"] / echo["gets_per_s"]
    ours_p50 = ours["fixed_rate"][low_rate]["p50_ms"]
    echo_p50 = echo["fixed_rate"][low_rate]["p50_ms"]
    vs_direct_raw = ours["gets_per_s"] / direct["gets_per_s"]
    vs_direct_cpu = ours["gets_per_server_cpu_s"] / direct["gets_per_server_cpu_s"]
    # The lower of the two: on a shared machine one responder may get more CPU than the
    # other in its window, which raw throughput alone would credit to the code.
    vs_direct = min(vs_direct_raw, vs_direct_cpu)
    return [
        {
            "name": "throughput per core >= 50% of the echo floor",
            "verdict": verdict(per_core >= 0.5),
            "ratio": round(per_core, 3),
            "measured": (
                f"{per_core:.1%} (gets per CPU-second of the responder: ours "
                f"{ours['gets_per_server_cpu_s']:.0f}, echo {echo['gets_per_server_cpu_s']:.0f}; "
                f"raw throughput 1 process vs echo {raw:.1%}); the crypto alone caps it at "
                f"{ceiling_per_core:.1%} ({echo_us:.0f} us echo + {crypto_us:.0f} us crypto a get)"
            ),
            "ceiling": round(ceiling_per_core, 3),
        },
        {
            "name": f"p50 latency <= floor + 0.5 ms at {low_rate}/s",
            "verdict": verdict(ours_p50 <= echo_p50 + 0.5),
            "ratio": round(ours_p50 - echo_p50, 3),
            "measured": (
                f"ours {ours_p50:.2f} ms vs echo {echo_p50:.2f} ms (+{ours_p50 - echo_p50:.2f} ms)"
            ),
        },
        {
            "name": ">= 3x the direct-KV baseline's throughput",
            "verdict": verdict(vs_direct >= 3),
            "ratio": round(vs_direct, 3),
            "measured": (
                f"{vs_direct:.2f}x, the lower of raw {vs_direct_raw:.2f}x (1 process each: "
                f"ours {ours['gets_per_s']:.0f}/s, direct-KV {direct['gets_per_s']:.0f}/s) and "
                f"per CPU-second {vs_direct_cpu:.2f}x; the crypto alone caps it at "
                f"{ceiling_vs_direct:.2f}x ({direct_us:.0f} us direct-KV vs {least_us:.0f} us)"
            ),
            "ceiling": round(ceiling_vs_direct, 3),
        },
    ]


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = QUICK if args.quick else DEFAULT
    if args.measure_s:
        scale = replace(scale, measure_s=args.measure_s)
    workers = args.workers
    results: dict[str, Any] = {
        "command": "python -m bench.bench_get" + (" --quick" if args.quick else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scale": asdict(scale),
        "gets": {},
    }
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-get-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        server = NatsServer(NatsServerConfig.in_dir(tmp_path / "nats", server_name="bench"))
        server.start()
        stack.callback(server.stop)
        names = BackendNames()
        bench = Bench(scale, server, args.gen_procs, tmp_path, names)
        stack.callback(bench.head_reads.close)
        bench.say(f"nats-server {server.url}; minting {scale.entities} entities")
        data = Dataset.make(scale.secrets, scale.entities, scale.hosts)
        request_size, reply_size = get_sizes(data, scale.secrets)
        results["sizes"] = {"request_bytes": request_size, "reply_bytes": reply_size}
        echo_workload = EchoWorkload(names.subject("get"), request_size, reply_size)
        get_workload = data.workload(names)
        trusted = ("--trusted-issuer", data.account.public_key)

        # 1. the floor, and what the generator itself can do
        echo = SpawnedResponder("echo", serve_echo, server.url, names, reply_size)
        stack.callback(echo.stop)
        echo_by_procs = {}
        for procs in [1] if args.gen_procs != 1 else []:
            bench.say(f"generator ceiling: {procs} process(es) against echo")
            result = bench.load(
                echo_workload, echo, mode="closed", procs=procs, bank=scale.echo_bank
            )
            echo_by_procs[str(procs)] = {
                "gets_per_s": round(result.throughput, 1),
                "responder_cores_busy": round(result.sampled["server"] / result.window_s, 2),
                "generator_cpu_us_per_req": round(
                    result.generator_cpu_s / max(1, result.in_window) * 1e6, 1
                ),
            }
        measured = bench.measure(echo, echo_workload)
        echo_by_procs[str(args.gen_procs)] = {
            "gets_per_s": round(measured.throughput, 1),
            "responder_cores_busy": round(measured.cores_busy, 2),
            "generator_cpu_us_per_req": round(
                measured.saturation.generator_cpu_s / max(1, measured.saturation.in_window) * 1e6, 1
            ),
        }
        results["gets"]["echo"] = measured.summary()
        echo.stop()
        bench.say("crypto floor: the protocol's three Curve25519 operations per get, in-process")
        results["crypto_floor"] = measure_crypto_floor(
            data.transit, request_size, reply_size, count=2_000
        )

        # 2. the data set, appended to the log as our command actors would
        bench.say(f"setup: {scale.secrets} secrets, {scale.entities} mappings into the log")
        started = time.monotonic()
        asyncio.run(
            write_log(server.url, names, data.encryption, dataset_events(data), write_kv=False)
        )
        results["setup_s"] = round(time.monotonic() - started, 2)

        # 3. ours, one process (it also writes the KV view the direct-KV baseline reads)
        ours = OursResponder("ours-1", server.url, names, data.env(), tmp_path, extra=trusted)
        stack.callback(ours.stop)
        results["ours_1_ready_s"] = round(ours.ready_s, 3)
        kv_s = asyncio.run(wait_kv(server.url, names, scale.secrets, scale.entities, 300))
        results["kv_view_written_s_after_ready"] = round(kv_s, 2)
        measured = bench.measure(ours, get_workload, seed=1)
        # Later runs need no more sealed requests than 3x what one process answered (2
        # workers, with room to spare): preparing them is the slow part of a run.
        needed = 3 * measured.throughput * (scale.warmup_s + scale.measure_s)
        bench.get_bank = int(min(scale.get_bank, max(6_000, needed)))
        results["gets"]["ours-1"] = measured.summary()
        sat = measured.saturation
        results["generator"] = {
            "echo_by_procs": echo_by_procs,
            "cpu_us_per_get": round(sat.generator_cpu_s / max(1, sat.in_window) * 1e6, 1),
            "prepare_us_per_get": round(
                sum(w.prepare_s for w in sat.workers) / sum(w.bank for w in sat.workers) * 1e6, 1
            ),
        }
        if args.profile:
            py_spy = find_py_spy(args.py_spy)
            if py_spy is None:
                bench.say("--profile: py-spy not found (set PY_SPY or put it on PATH); skipped")
            else:
                bench.say(f"profile: {py_spy} on ours-1 under saturation")
                results["profile"] = profile_ours(bench, ours, get_workload, py_spy)
        bench.say("puts: sequential and concurrent, against ours-1")
        results["puts"] = asyncio.run(measure_puts(server.url, names, data.transit, scale))
        ours.stop()

        # 4. ours, N worker processes
        label = f"ours-{workers}"
        ours_n = OursResponder(
            label, server.url, names, data.env(), tmp_path, workers=workers, extra=trusted
        )
        stack.callback(ours_n.stop)
        results[f"ours_{workers}_ready_s"] = round(ours_n.ready_s, 3)
        results["gets"][label] = bench.measure(ours_n, get_workload, seed=2).summary()
        ours_n.stop()

        # 5. the direct-KV baseline on the KV view our backend wrote
        direct = SpawnedResponder(
            "direct-kv",
            serve_direct_kv,
            server.url,
            names,
            data.transit.seed,
            data.encryption.seed,
            data.account.public_key,
        )
        stack.callback(direct.stop)
        results["gets"]["direct-kv"] = bench.measure(direct, get_workload, seed=3).summary()
        results["direct_kv_jwt_cache"] = direct.stop()

        # 6. memory and cold start
        bench.say("memory: folding secrets in-process under tracemalloc")
        results["memory"] = {
            "fold": fold_memory(scale.cold_events, data.encryption),
            "cold": measure_cold_start(bench, data),
        }
    results["targets"] = targets(
        results["gets"], str(int(scale.rates[0])), results["crypto_floor"]["cpu_us_per_get"]
    )
    results["duration_s"] = round(time.monotonic() - t_start, 1)
    return results


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_get", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smaller run")
    parser.add_argument("--workers", type=int, default=2, help="N of `run --workers N`")
    parser.add_argument("--gen-procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--measure-s", type=float, default=None, help="override the window")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the `run` process under saturation"
    )
    parser.add_argument("--py-spy", default=None, help="path of the py-spy binary")
    parser.add_argument("--output", default=str(RESULTS / "get.json"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: servers and backends stopped\n")
        return 130
    finally:
        for pid in list(_PIDS_STARTED):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    profile = results.get("profile")
    if profile and "self_pct" in profile:
        print(f"\nprofile of ours-1 under saturation ({profile['samples']} samples), self time:")
        for frame, pct in profile["self_pct"][:15]:
            print(f"  {pct:5.1f}%  {frame}")
    print(f"\nwrote {output} in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
