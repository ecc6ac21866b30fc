"""The load generator of the get benchmark: several processes, each one NATS connection.

One Python process cannot saturate a responder that is as fast as itself, so a run is
spread over `procs` spawned processes that start their timed window together (all clocks
are CLOCK_MONOTONIC, shared by every process on the machine). Two shapes:

- closed loop (saturation): `concurrency` requests outstanding per process, each reply
  immediately followed by the next request, for warmup + measure seconds;
- open loop (fixed offered load): requests fired on a fixed schedule whatever the replies
  do, so a slow responder cannot hide its queueing behind a generator that waits for it
  (coordinated omission). Latency is counted from the moment a request is sent; how late
  the generator sent it against its schedule is reported apart (asyncio's timers are
  millisecond-grained, and that is the generator's noise, not the responder's).

A `get` is built exactly as a wasmCloud host builds it: `server_xkey` is fetched once per
process, then every request has its own fresh xkey and carries real JWTs. The crypto of
those requests is done before the window opens (a "bank" of sealed requests), so the
window measures the responder, not the host's key generation; replies are checked for
the success header and a sample of them (all of them in open-loop runs) is opened and
compared with the value the setup stored. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from secrets_nats_kv import wire
from secrets_nats_kv.wire import HOST_XKEY_HEADER, RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey

NS = 1_000_000_000
_SPAWN = multiprocessing.get_context("spawn")  # no inherited event loops or sockets
_READY_TIMEOUT_S = 120.0  # building a bank of sealed requests is the slow part


def secret_value(name: str) -> str:
    """The value the setup stores under `name`: derivable, so replies can be checked."""
    return f"value-of-{name}-" + hashlib.blake2b(name.encode(), digest_size=12).hexdigest()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc (children it has not reaped are not in it)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- what to send ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoWorkload:
    """Traffic shaped like a get (same request size and header) to a bare echo responder."""

    subject: str
    request_size: int
    reply_size: int


@dataclass(frozen=True)
class GetWorkload:
    """The hosts' side: entities with the JWT their component carries and the secrets
    mapped to them, the host JWTs, and where to ask."""

    subject_prefix: str
    entities: tuple[tuple[str, tuple[str, ...]], ...]  # (entity JWT, secret names)
    host_jwts: tuple[str, ...]
    application: str = "bench-app"


Workload = EchoWorkload | GetWorkload


@dataclass(frozen=True)
class LoadSpec:
    """One run of the generator: shape, size and time bounds."""

    url: str
    mode: Literal["closed", "open"]
    warmup_s: float
    measure_s: float
    requests_per_proc: int  # the bank size: a hard bound on what one process sends
    concurrency: int = 64  # closed loop: outstanding requests per process
    rate: float = 0.0  # open loop: total offered requests per second (over all processes)
    timeout_s: float = 5.0
    verify_every: int = 1  # open and compare every n-th successful get reply
    seed: int = 0


@dataclass
class WorkerResult:
    """What one generator process saw; timestamps are monotonic ns, shared across processes."""

    index: int
    bank: int
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    in_window: int = 0  # successful replies completed inside the measurement window
    latencies_ns: list[int] = field(default_factory=list)  # of the in-window requests
    verified: int = 0
    verify_failures: int = 0
    lateness_ns: list[int] = field(default_factory=list)  # open loop: sent minus scheduled
    exhausted_ns: int | None = None  # when the bank ran out, if it did before the end
    cpu_s: float = 0.0  # this process's CPU time over the window
    prepare_s: float = 0.0


@dataclass
class LoadResult:
    """All processes together, plus what the caller sampled over the same window."""

    spec: LoadSpec
    procs: int
    window_s: float
    workers: list[WorkerResult]
    sampled: dict[str, float]  # name -> CPU seconds over the window (from `sample`)

    @property
    def ok(self) -> int:
        return sum(w.ok for w in self.workers)

    @property
    def in_window(self) -> int:
        return sum(w.in_window for w in self.workers)

    @property
    def throughput(self) -> float:
        return self.in_window / self.window_s if self.window_s > 0 else 0.0

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for worker in self.workers:
            for key, count in worker.errors.items():
                out[key] = out.get(key, 0) + count
            if worker.timeouts:
                out["timeout"] = out.get("timeout", 0) + worker.timeouts
            if worker.verify_failures:
                out["wrong value"] = out.get("wrong value", 0) + worker.verify_failures
        return out

    @property
    def exhausted(self) -> bool:
        return any(w.exhausted_ns is not None for w in self.workers)

    def percentile_ms(self, q: float) -> float:
        return percentile_ms([x for w in self.workers for x in w.latencies_ns], q)

    def lateness_ms(self, q: float) -> float:
        return percentile_ms([x for w in self.workers for x in w.lateness_ns], q)

    @property
    def generator_cpu_s(self) -> float:
        return sum(w.cpu_s for w in self.workers)


def percentile_ms(values_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds (NaN when there is nothing to rank)."""
    if not values_ns:
        return float("nan")
    ordered = sorted(values_ns)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index] / 1e6


# --- one generator process ----------------------------------------------------------------


@dataclass(slots=True)
class _Prepared:
    payload: bytes
    headers: dict[str, str]
    key: XKey | None  # the host's one-off key, to open the reply with
    expected: str | None


def _bank_echo(workload: EchoWorkload, count: int) -> list[_Prepared]:
    """Echo requests carry no crypto, so one prepared request is sent `count` times."""
    one = _Prepared(
        os.urandom(workload.request_size),
        {HOST_XKEY_HEADER: XKey.generate().public_key},
        None,
        None,
    )
    return [one] * count


def _bank_get(
    workload: GetWorkload, transit: XKey, count: int, rng: random.Random
) -> list[_Prepared]:
    """`count` sealed gets, each from its own fresh xkey, for random (entity, secret, host)."""
    bank = []
    for _ in range(count):
        entity_jwt, names = rng.choice(workload.entities)
        name = rng.choice(names)
        body = wire.encode_secret_request(
            wire.SecretRequest(
                key=name,
                context=wire.Context(
                    entity_jwt=entity_jwt,
                    host_jwt=rng.choice(workload.host_jwts),
                    application=wire.Application(name=workload.application),
                ),
            )
        )
        key = XKey.generate()
        bank.append(
            _Prepared(
                key.seal(body, transit), {HOST_XKEY_HEADER: key.public_key}, key, secret_value(name)
            )
        )
    return bank


class _Checker:
    """Classifies replies: success, the wire error they carry, or a wrong value."""

    def __init__(self, result: WorkerResult, workload: Workload, verify_every: int) -> None:
        self._result = result
        self._echo_size = workload.reply_size if isinstance(workload, EchoWorkload) else None
        self._verify_every = max(1, verify_every)
        self._successes = 0

    def check(self, msg: Msg, prepared: _Prepared) -> bool:
        result = self._result
        if self._echo_size is not None:
            if len(msg.data) == self._echo_size:
                return True
            self._error("bad echo")
            return False
        headers = msg.headers or {}
        server_key = headers.get(RESPONSE_XKEY_HEADER)
        if server_key is None:
            self._error(_error_text(msg.data))
            return False
        self._successes += 1
        if prepared.key is not None and self._successes % self._verify_every == 0:
            result.verified += 1
            try:
                secret = wire.decode_secret_response(prepared.key.open(msg.data, server_key))
            except Exception:
                result.verify_failures += 1
                return False
            if secret.string_secret != prepared.expected:
                result.verify_failures += 1
                return False
        return True

    def _error(self, text: str) -> None:
        errors = self._result.errors
        errors[text] = errors.get(text, 0) + 1


def _error_text(data: bytes) -> str:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data[:60].decode(errors="replace")
    error = value.get("error") if isinstance(value, dict) else value
    return msgspec.json.encode(error).decode()[:80]


async def _fetch_transit(nc: NATS, workload: GetWorkload) -> XKey:
    """`server_xkey`, once per process, as a host does per backend (bounded retries)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            msg = await nc.request(f"{workload.subject_prefix}.server_xkey", b"", timeout=1)
            return XKey.from_public(msg.data.decode())  # parsed once, as a host keeps it
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _closed_loop(
    nc: NATS,
    subject: str,
    bank: list[_Prepared],
    spec: LoadSpec,
    result: WorkerResult,
    checker: _Checker,
    window: tuple[int, int],
) -> None:
    window_start, window_end = window
    start_ns = window_start - int(spec.warmup_s * NS)
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while time.monotonic_ns() < window_end:
            if next_index >= len(bank):
                if result.exhausted_ns is None:
                    result.exhausted_ns = time.monotonic_ns()
                return
            prepared = bank[next_index]
            next_index += 1
            result.sent += 1
            timing = await _timed_request(nc, subject, prepared, spec, result, checker)
            if timing is not None:
                sent_ns, done_ns = timing
                if window_start <= done_ns < window_end:
                    result.in_window += 1
                    result.latencies_ns.append(done_ns - sent_ns)

    await _sleep_until(start_ns)
    await asyncio.gather(*(client() for _ in range(spec.concurrency)))


async def _timed_request(
    nc: NATS,
    subject: str,
    prepared: _Prepared,
    spec: LoadSpec,
    result: WorkerResult,
    checker: _Checker,
) -> tuple[int, int] | None:
    """Send one prepared get; count a timeout or a good reply; (sent, done) of a good one."""
    sent_ns = time.monotonic_ns()
    try:
        msg = await nc.request(
            subject, prepared.payload, timeout=spec.timeout_s, headers=prepared.headers
        )
    except nats.errors.TimeoutError:
        result.timeouts += 1
        return None
    done_ns = time.monotonic_ns()
    if not checker.check(msg, prepared):
        return None
    result.ok += 1
    return sent_ns, done_ns


async def _open_loop(
    nc: NATS,
    subject: str,
    bank: list[_Prepared],
    spec: LoadSpec,
    result: WorkerResult,
    checker: _Checker,
    window: tuple[int, int],
    index: int,
    procs: int,
) -> None:
    window_start, window_end = window
    start_ns = window_start - int(spec.warmup_s * NS)
    interval_ns = int(procs * NS / spec.rate)
    offset_ns = index * interval_ns // procs  # processes interleave their schedules
    pending: set[asyncio.Task[None]] = set()

    async def one(prepared: _Prepared, scheduled_ns: int) -> None:
        timing = await _timed_request(nc, subject, prepared, spec, result, checker)
        if timing is not None and window_start <= scheduled_ns < window_end:
            sent_ns, done_ns = timing
            result.in_window += 1
            result.latencies_ns.append(done_ns - sent_ns)
            result.lateness_ns.append(sent_ns - scheduled_ns)

    for i, prepared in enumerate(bank):
        scheduled_ns = start_ns + offset_ns + i * interval_ns
        if scheduled_ns >= window_end:
            break
        await _sleep_until(scheduled_ns)
        result.sent += 1
        task = asyncio.create_task(one(prepared, scheduled_ns))
        pending.add(task)
        task.add_done_callback(pending.discard)
    else:
        result.exhausted_ns = time.monotonic_ns()
    if pending:  # every request has its own timeout, so this wait is bounded
        await asyncio.wait(pending, timeout=spec.timeout_s + 1)


async def _cpu_over(window: tuple[int, int]) -> float:
    """This process's CPU seconds between the window's start and end."""
    await _sleep_until(window[0])
    before = time.process_time()
    await _sleep_until(window[1])
    return time.process_time() - before


async def _sleep_until(when_ns: int) -> None:
    delay = (when_ns - time.monotonic_ns()) / NS
    if delay > 0:
        await asyncio.sleep(delay)


async def _worker(
    conn: multiprocessing.connection.Connection,
    spec: LoadSpec,
    workload: Workload,
    index: int,
    procs: int,
) -> WorkerResult:
    nc = await nats.connect(spec.url, name=f"bench load {index}", pending_size=64 * 1024 * 1024)
    try:
        rng = random.Random(spec.seed * 1000 + index)
        started = time.perf_counter()
        if isinstance(workload, GetWorkload):
            subject = f"{workload.subject_prefix}.get"
            transit = await _fetch_transit(nc, workload)
            bank = _bank_get(workload, transit, spec.requests_per_proc, rng)
        else:
            subject = workload.subject
            bank = _bank_echo(workload, spec.requests_per_proc)
        result = WorkerResult(index=index, bank=len(bank))
        result.prepare_s = time.perf_counter() - started
        checker = _Checker(result, workload, spec.verify_every)
        conn.send("ready")
        window: tuple[int, int] = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        cpu = asyncio.create_task(_cpu_over(window))
        if spec.mode == "closed":
            await _closed_loop(nc, subject, bank, spec, result, checker, window)
        else:
            await _open_loop(nc, subject, bank, spec, result, checker, window, index, procs)
        result.cpu_s = await cpu
        return result
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


def _worker_main(
    conn: multiprocessing.connection.Connection,
    spec: LoadSpec,
    workload: Workload,
    index: int,
    procs: int,
) -> None:
    try:
        result = asyncio.run(_worker(conn, spec, workload, index, procs))
    except KeyboardInterrupt:
        return
    except BaseException as exc:
        conn.send(f"error: {type(exc).__name__}: {exc}")
        return
    conn.send(result)


# --- the coordinator ------------------------------------------------------------------------


def run_load(
    spec: LoadSpec,
    workload: Workload,
    procs: int,
    *,
    sample: Callable[[], dict[str, float]] | None = None,
    on_window: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the generator in `procs` processes; `sample()` (CPU counters of the processes
    under test) is called at the window's start and end, from this process, and
    `on_window()` (e.g. to start a profiler) right after the first sample."""
    conns: list[multiprocessing.connection.Connection] = []
    workers: list[Any] = []  # spawn-context processes
    try:
        for index in range(procs):
            parent, child = _SPAWN.Pipe()
            process = _SPAWN.Process(
                target=_worker_main, args=(child, spec, workload, index, procs), daemon=True
            )
            process.start()
            child.close()
            conns.append(parent)
            workers.append(process)
        for conn in conns:
            _expect(conn, "ready", _READY_TIMEOUT_S)
        window_start = time.monotonic_ns() + int(0.2 * NS) + int(spec.warmup_s * NS)
        window_end = window_start + int(spec.measure_s * NS)
        for conn in conns:
            conn.send((window_start, window_end))
        before = _sample_at(window_start, sample)
        if on_window is not None:
            on_window()
        after = _sample_at(window_end, sample)
        sampled = {name: after[name] - before.get(name, 0.0) for name in after}
        budget = spec.measure_s + spec.timeout_s + 30
        results = [_expect(conn, WorkerResult, budget) for conn in conns]
    finally:
        for process in workers:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for conn in conns:
            conn.close()
    window_ns = window_end - window_start
    exhausted = [r.exhausted_ns for r in results if r.exhausted_ns is not None]
    if exhausted and spec.mode == "closed":  # the window ends where the first bank ran dry
        window_ns = max(1, min(window_end, min(exhausted)) - window_start)
    return LoadResult(spec, procs, window_ns / NS, results, sampled)


def _sample_at(when_ns: int, sample: Callable[[], dict[str, float]] | None) -> dict[str, float]:
    delay = (when_ns - time.monotonic_ns()) / NS
    if delay > 0:
        time.sleep(delay)
    return sample() if sample is not None else {}


def _expect(conn: multiprocessing.connection.Connection, what: object, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"a load generator process gave no answer within {timeout:.0f}s")
    message = conn.recv()
    if isinstance(message, str) and message.startswith("error:"):
        raise RuntimeError(f"load generator failed: {message[7:]}")
    if isinstance(what, str) and message != what:
        raise RuntimeError(f"load generator said {message!r}, expected {what!r}")
    if isinstance(what, type) and not isinstance(message, what):
        raise RuntimeError(f"load generator sent {type(message).__name__}")
    return message


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat), to see how much
    of a window went to processes that are not part of the benchmark."""
    with open("/proc/stat", encoding="ascii") as handle:
        ticks = [int(x) for x in handle.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sum_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of processes that may have exited (those count as 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(pid)
    return total
