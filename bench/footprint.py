"""Memory, cold start, the crypto floor and a py-spy profile of ours."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import shutil
import subprocess
import time
import tracemalloc
from typing import Any

from bench.fixtures import (
    REPO,
    RESULTS,
    Dataset,
    put_events,
    write_log,
)
from bench.load import (
    GetWorkload,
)
from bench.measure import (
    Bench,
)
from bench.responders import (
    OursResponder,
)
from events.types import encode_event
from projections.state import ViewState, fold
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.xkeys import XKey

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
