"""`python -m bench.bench_rotation [--versions N]`: how fast the encryption key rotates.

Issue 15 asks for the rotation speed in values/s for 100 000 versions, online (backends
serving, a host and an admin loading them) against the offline rotation, measured in the
same run as its floor. This starts its own nats-server and writes N `SecretPut`
versions (over `--secrets` names, so most names have more versions than the KV history
keeps) and one mapping straight into the log, through the event codec and the
positioned publisher, tagged exactly as a backend's appender tags them. Then:

1. **offline floor**: `secrets-nats-kv rotate-key` (a real CLI process, no backend
   running), key 0 to key 1. Its wall time includes the interpreter's start-up, as the
   online run's does.
2. **online**: two `secrets-nats-kv run` processes holding key 1 and, as next, key 2
   (the procedure's step 1; each waits for its own `backend ready`), a wasmCloud host
   doing a `get` every 20 ms and an admin a `put` every 200 ms
   (tests/support/rotation_load.py), and `rotate-key --online`, key 1 to key 2. The load
   keeps running for `--tail-s` seconds after the rotation, so the backends' switch to
   the new key is inside the window.

It reports values re-sealed per second for both and their ratio (online / offline),
and for the online window: gets, failed gets, acknowledged and refused (fenced) puts, the
longest pause between acknowledged writes, and whether every acknowledged write is
served at its version afterwards. It prints a table and writes
`bench/results/rotation.json` (`--output` to change). If `rotate-key --online` is not
available (the CLI refuses the flag), the online half is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from bench.fixtures import event_provenance, write_log
from events.types import Event, MappingAdded, SecretPut
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import SealBox, XKey
from tests.support.host import HostClient
from tests.support.rotation_load import (
    CLI,
    REPO,
    Fleet,
    Load,
    backend_env,
    rotation_env,
    unserved_writes,
)
from tests.support.tokens import mint_component_jwt, mint_host_jwt

NAMES = BackendNames()
RESEALED = re.compile(r"(\d+) values re-sealed")
FENCED = re.compile(r"writes fenced for ([0-9.]+)s")  # the online summary's own measure


@contextlib.contextmanager
def nats_server(workdir: Path) -> Iterator[NatsServer]:
    server = NatsServer(NatsServerConfig.in_dir(workdir / "nats", server_name="bench-rotation"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def value_of(name: str, version: int) -> str:
    return f"value {version} of {name}"


def versions(key: XKey, admin: XKey, count: int, secrets: int, reader: str) -> Iterator[Event]:
    """`count` puts over `secrets` names (version i of name i % secrets), then the mapping
    that lets `reader` get every one of them."""
    box = SealBox(key, key)
    names = [secret_name(i) for i in range(secrets)]
    for i in range(count):
        name = names[i % secrets]
        yield SecretPut(
            name=name, sealed=box.seal(value_of(name, i).encode()), **event_provenance(admin)
        )
    yield MappingAdded(entity=reader, secrets=tuple(names), **event_provenance(admin))


def secret_name(i: int) -> str:
    return f"rot-{i:05d}"


def rotate(
    url: str, transit: XKey, old: XKey, new: XKey, *flags: str
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """`rotate-key` as a CLI process; the result and its wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [*CLI, "rotate-key", *flags, "--nats-address", url],
        env=rotation_env(transit, old, new),
        capture_output=True,
        timeout=1800,
        check=False,
        cwd=REPO,
    )
    return done, time.perf_counter() - started


def speed(done: subprocess.CompletedProcess[bytes], seconds: float) -> dict[str, Any]:
    line = done.stdout.decode(errors="replace").strip()
    match = RESEALED.search(line)
    resealed = int(match.group(1)) if match else 0
    fenced = FENCED.search(line)
    return {
        "ok": done.returncode == 0,
        "seconds": seconds,
        "values_resealed": resealed,
        "values_per_s": resealed / seconds if seconds else 0.0,
        "fenced_s": float(fenced.group(1)) if fenced else None,
        "summary": line,
        "error": done.stderr.decode(errors="replace").strip()[-500:],
    }


async def measure(
    url: str, monitor_url: str, workdir: Path, count: int, secrets: int, tail_s: float
) -> Any:
    transit, k0, k1, k2 = (XKey.generate() for _ in range(4))
    account = SigningKey.generate(Role.ACCOUNT)
    reader = SigningKey.generate(Role.MODULE)
    entity_jwt = mint_component_jwt(account, reader.public_key, name="bench-reader")
    host_jwt = mint_host_jwt(account, SigningKey.generate(Role.SERVER).public_key, name="h")
    started = time.perf_counter()
    events = versions(k0, transit, count, secrets, reader.public_key)
    await write_log(url, NAMES, k0, events, write_kv=False)
    results: dict[str, Any] = {
        "versions": count,
        "secrets": secrets,
        "fill_s": time.perf_counter() - started,
    }

    done, seconds = await anyio.to_thread.run_sync(lambda: rotate(url, transit, k0, k1))
    results["offline"] = speed(done, seconds)
    if not results["offline"]["ok"]:
        return results

    backends = Fleet(url, workdir, monitor_url)
    try:
        both = backend_env(transit, k1, k2)
        starts = []
        for index in range(2):
            began = time.perf_counter()
            await backends.start(index, both)
            starts.append(time.perf_counter() - began)
        results["backend_start_s"] = starts
        nc = await connect(NatsOptions(servers=(url,)), name="bench load", persistent=False)
        try:
            written = {
                secret_name(i): {value_of(secret_name(i), v) for v in range(i, count, secrets)}
                for i in range(secrets)
            }
            names = sorted(written)
            load = Load(nc, NAMES, transit, entity_jwt, host_jwt, names, written)
            async with load.running():
                done, seconds = await anyio.to_thread.run_sync(
                    lambda: rotate(url, transit, k1, k2, "--online")
                )
                rotation_ended = time.monotonic()
                await anyio.sleep(tail_s)  # the backends' switch falls inside the window
            online = speed(done, seconds)
            online.update(load.summary())
            online["wrong_values"] = len(load.wrong_values)
            host = HostClient(nc, NAMES)
            problems = await unserved_writes(host, entity_jwt, host_jwt, load.acks)
            online["acknowledged_writes_unserved"] = len(problems)
            online["unserved_examples"] = problems[:10]
            online["put_error_examples"] = load.put_errors[:10]
            online["acks"] = [(a.name, a.version, round(a.at - load.started, 3)) for a in load.acks]
            online["refusals"] = [round(at - load.started, 3) for at in load.refusals]
            online["failed_get_examples"] = [
                (
                    f.name,
                    f.error,
                    round(f.sent - load.started, 3),
                    round(f.failed - load.started, 3),
                )
                for f in load.failed_gets[:: max(1, len(load.failed_gets) // 20)]
            ]
            online["rotation_ended_s"] = round(rotation_ended - load.started, 3)
            results["online"] = online
        finally:
            await nc.close()
    finally:
        backends.close()
    if results["online"]["ok"] and results["offline"]["values_per_s"]:
        ratio = results["online"]["values_per_s"] / results["offline"]["values_per_s"]
        results["online_over_offline"] = ratio
    return results


def run(count: int, secrets: int, tail_s: float, workdir: Path) -> Any:
    with nats_server(workdir) as server:
        return anyio.run(
            measure, server.url, server.config.monitor_url, workdir, count, secrets, tail_s
        )


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['versions']} versions of {results['secrets']} secrets "
        f"(log written in {results['fill_s']:.1f}s)",
        f"{'rotation':<28}{'seconds':>9}{'values':>9}{'values/s':>10}",
    ]
    for label in ("offline", "online"):
        row = results.get(label)
        if row is None:
            continue
        if not row["ok"]:
            lines.append(f"{label:<28}failed: {row['error'].splitlines()[-1:]}")
            continue
        lines.append(
            f"{label:<28}{row['seconds']:>9.2f}{row['values_resealed']:>9}"
            f"{row['values_per_s']:>10,.0f}"
        )
    if "online_over_offline" in results:
        lines.append(f"online / offline (the floor): {results['online_over_offline']:.2f}")
    online = results.get("online")
    if online is not None and online["ok"]:
        lines.append(
            f"during the online run: {online['gets']} gets, {online['failed_gets']} failed, "
            f"{online['wrong_values']} wrong; {online['acknowledged_puts']} puts acknowledged, "
            f"{online['refused_puts']} refused by the fence, {online['put_errors']} errors; "
            f"writes fenced for {online['fenced_s']}s (the command's count), "
            f"longest write pause {online['longest_write_pause_s']:.2f}s; "
            f"{online['acknowledged_writes_unserved']} acknowledged writes not served after"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_rotation", description=__doc__)
    parser.add_argument("--versions", type=int, default=100_000, help="default 100000")
    parser.add_argument("--secrets", type=int, default=1_000, help="names (default 1000)")
    parser.add_argument("--tail-s", type=float, default=3.0, help="load after the rotation")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "rotation.json")
    )
    parser.add_argument("--quick", action="store_true", help="10 000 versions of 200 secrets")
    args = parser.parse_args(argv)
    if args.quick:
        args.versions, args.secrets = 10_000, 200
    if args.versions < 1 or not 1 <= args.secrets <= args.versions:
        parser.error("--versions must be positive and --secrets between 1 and --versions")
    # SIGTERM unwinds like Ctrl-C, so the nats-server and backends this started stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as workdir:
        results = run(args.versions, args.secrets, args.tail_s, Path(workdir))
    results["machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(table(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
