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
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench.fixtures import (
    DEFAULT,
    QUICK,
    RESULTS,
    Dataset,
    dataset_events,
    get_sizes,
    wait_kv,
    write_log,
)
from bench.footprint import (
    find_py_spy,
    fold_memory,
    measure_cold_start,
    measure_crypto_floor,
    profile_ours,
)
from bench.load import (
    EchoWorkload,
)
from bench.measure import (
    Bench,
    measure_puts,
)
from bench.report import (
    report,
    targets,
)
from bench.responders import (
    PIDS_STARTED,
    OursResponder,
    SpawnedResponder,
    serve_direct_kv,
    serve_echo,
)
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import BackendNames

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
        for pid in list(PIDS_STARTED):
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
