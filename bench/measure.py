"""Measuring: request counters, one measured load, the bench itself, and the puts."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.msg import Msg

from bench.fixtures import (
    QUEUEING_MS,
    Scale,
)
from bench.load import (
    EchoWorkload,
    LoadResult,
    LoadSpec,
    Workload,
    machine_busy_seconds,
    run_load,
    secret_value,
    sum_cpu,
)
from bench.responders import (
    Responder,
)
from events.log import stream_name
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nats.jetstream import stream_info_subject
from secrets_nats_kv.xkeys import XKey

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
        self.head_reads = SubjectCounter(server.url, stream_info_subject(stream_name(names.name)))
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
