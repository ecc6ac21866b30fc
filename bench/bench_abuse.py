"""`python -m bench.bench_abuse [--quick]`: what the issue's attacks cost a running backend.

Starts its own nats-server and real `secrets-nats-kv run` processes, then:

1. **Unique big tokens.** 6 000 gets, each with a unique, validly self-signed entity JWT
   of an untrusted account: ~64 KiB tokens against a backend with `--trusted-issuer`
   (the issue's attack), and tokens just under the size limit against a backend without
   one (every token verifies and is cached: the cache's byte bound is what holds). It
   samples the backend's RSS (`/proc/PID/status`) idle, during and after; the bound is
   50 MiB above idle.
2. **Junk flood**, twice: a host gets a secret in a loop while a plain connection
   publishes untagged junk as fast as it can for 5 s, then the loop goes on for 10 s.
   Once on `wasmcloud_secrets_events.{name}.junk` (under the log's prefix, but a subject
   the log does not keep), once on `wasmcloud_secrets_events.{name}.secret.junk` (a
   subject the log keeps: every message is stored and rejected; the host gets another
   secret, `s`, so a view behind the junk serves it once it has folded `s`'s own entries:
   `projections.freshness`). Reported: the junk
   published, the log's messages before and after, gets (ok / failed, median and worst
   latency) before, during and after the flood, how long after the flood the first fast
   get succeeded (the loop waits up to 120 s for it), that as a ratio to the flood's
   length (the issue's bound: at most 1), the median get during the flood as a ratio to
   the median before it (the floor), the backend's log size before and after, and the
   cost of rejecting one entry (tag check plus fold) in µs, untagged and with a forged tag,
   and how long a restart takes to catch up over the flooded log, against a restart of a
   backend with the same history and no flood (the floor); then `secrets-nats-kv repair`
   (which records and erases the junk: its time, its line, the log's messages after it)
   and a restart after it.

Timing figures depend on the machine: compare the phases of one run, not runs.
It prints JSON and writes `bench/results/abuse.json` (`--output` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from nats.aio.client import Client as NATS

from events.codec import EventCodec
from events.log import stream_name
from events.types import Rejected
from projections.state import ViewState, fold
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER, Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import SecretsBackendError
from secrets_nats_kv.jwt import MAX_TOKEN_LENGTH
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import events_subject_prefix
from secrets_nats_kv.xkeys import XKey
from tests.support.host import HostClient
from tests.support.tokens import encode_jwt, mint_component_jwt, mint_host_jwt

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    log: Path
    names: BackendNames
    transit: XKey
    encryption: XKey


async def start_backend(
    url: str, directory: Path, *flags: str, again: Backend | None = None
) -> Backend:
    """A new backend with fresh names and keys, or `again` restarted (same names and keys)."""
    if again is not None:
        names, transit, encryption = again.names, again.transit, again.encryption
    else:
        names = BackendNames(
            name=f"b{secrets.token_hex(4)}", secrets_bucket=f"S{secrets.token_hex(4)}"
        )
        transit, encryption = XKey.generate(), XKey.generate()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
    env.update(
        PYTHONPATH=str(REPO), TRANSIT_XKEY_SEED=transit.seed, ENCRYPTION_XKEY_SEED=encryption.seed
    )
    log = directory / f"{names.name}.log"
    command = [sys.executable, "-m", "secrets_nats_kv.app.cli", "run", "--nats-address", url]
    command += ["--name", names.name, "-b", names.secrets_bucket, *flags]
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a start, not a wait)
            command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    nc = await connect(NatsOptions(servers=(url,)), name="probe", persistent=False)
    try:
        with anyio.fail_after(300):  # a restart reads the whole log first
            while True:
                try:
                    await nc.request(names.subject("server_xkey"), b"", timeout=0.5)
                    break
                except Exception:
                    await anyio.sleep(0.05)  # polling for readiness, with a deadline
    finally:
        await nc.close()
    return Backend(proc, log, names, transit, encryption)


def stop(backend: Backend) -> None:
    backend.proc.terminate()
    backend.proc.wait(15)


def big_token(account: SigningKey, subject: str, size: int) -> str:
    claims: dict[str, object] = {
        "jti": secrets.token_hex(11),
        "iat": int(time.time()),
        "iss": account.public_key,
        "sub": subject,
        "wascap": {"name": "x" * max(0, size * 3 // 4 - 400)},
    }
    return encode_jwt(claims, account)


async def token_attack(url: str, directory: Path, count: int, *, trusted: bool) -> dict[str, Any]:
    lattice, stranger = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.ACCOUNT)
    flags = ("--trusted-issuer", lattice.public_key) if trusted else ()
    backend = await start_backend(url, directory, *flags)
    size = 64 * 1024 if trusted else MAX_TOKEN_LENGTH - 64
    entity = SigningKey.generate(Role.MODULE).public_key
    host_key = SigningKey.generate(Role.SERVER)
    host_jwt = mint_host_jwt(lattice, host_key.public_key)
    nc = await connect(NatsOptions(servers=(url,)), name="attacker", persistent=False)
    host = HostClient(nc, backend.names, timeout=30)
    samples: list[int] = []
    try:
        good = mint_component_jwt(lattice, entity)
        for _ in range(20):  # warm up: imports, caches, the first gets
            await get_quietly(host, good, host_jwt)
        idle = rss(backend.proc.pid)
        sent = 0
        started = time.perf_counter()
        limit = anyio.Semaphore(32)

        async def one(token: str) -> None:
            async with limit:
                await get_quietly(host, token, host_jwt)

        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                while True:
                    samples.append(rss(backend.proc.pid))
                    await anyio.sleep(0.1)  # a sampler's period

            tg.start_soon(sample)
            async with anyio.create_task_group() as senders:
                for _ in range(count):
                    await limit.acquire()  # mint only as fast as the backend answers
                    limit.release()
                    senders.start_soon(one, big_token(stranger, entity, size))
                    sent += 1
            tg.cancel_scope.cancel()
        seconds = time.perf_counter() - started
        after = rss(backend.proc.pid)
    finally:
        await nc.close()
        stop(backend)
    peak = max([*samples, after])
    return {
        "tokens": sent,
        "token_chars": size,
        "trusted_issuer": trusted,
        "seconds": round(seconds, 1),
        "rss_idle_mib": round(idle / MIB, 1),
        "rss_peak_mib": round(peak / MIB, 1),
        "rss_after_mib": round(after / MIB, 1),
        "rss_growth_mib": round((peak - idle) / MIB, 1),
        "within_50_mib": peak - idle <= 50 * MIB,
    }


async def get_quietly(host: HostClient, entity_jwt: str, host_jwt: str) -> str:
    """One get; the protocol error's name if it was refused."""
    try:
        await host.get("s", entity_jwt=entity_jwt, host_jwt=host_jwt)
    except SecretsBackendError as exc:
        return type(exc).__name__
    return "ok"


@dataclass
class Gets:
    at: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)

    def window(self, start: float, end: float) -> dict[str, Any]:
        chosen = [i for i, t in enumerate(self.at) if start <= t < end]
        latencies = [self.latency[i] for i in chosen]
        return {
            "gets": len(chosen),
            "failed": sum(not self.ok[i] for i in chosen),
            "median_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "worst_ms": round(max(latencies) * 1000, 1) if latencies else None,
        }


async def seed(url: str, backend: Backend) -> None:
    """The two entries the flooded backend's log starts with: a put and a mapping."""
    nc = await connect(NatsOptions(servers=(url,)), name="seed", persistent=False)
    try:
        admin = AdminClient(nc, backend.names, backend.transit)
        await admin.put_secret("s", "value")
        await admin.add_mapping(SigningKey.generate(Role.MODULE).public_key, ["s"])
    finally:
        await nc.close()


async def restart_time(url: str, directory: Path, backend: Backend) -> float:
    """Seconds from starting `backend` again (stopped) to its first answer: the catch-up."""
    started = time.perf_counter()
    again = await start_backend(url, directory, again=backend)
    seconds = time.perf_counter() - started
    stop(again)
    return round(seconds, 2)


async def junk_flood(url: str, directory: Path, flood_s: float, suffix: str) -> dict[str, Any]:
    floor = await start_backend(url, directory)  # the same history, never flooded
    await seed(url, floor)
    stop(floor)
    backend = await start_backend(url, directory)
    names = backend.names
    account, entity = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.MODULE)
    entity_jwt = mint_component_jwt(account, entity.public_key)
    host_jwt = mint_host_jwt(account, SigningKey.generate(Role.SERVER).public_key)
    nc = await connect(NatsOptions(servers=(url,)), name="bench", persistent=False)
    flooder = await connect(NatsOptions(servers=(url,)), name="flooder", persistent=False)
    gets = Gets()
    published = 0
    try:
        admin = AdminClient(nc, names, backend.transit)
        await admin.put_secret("s", "value")
        await admin.add_mapping(entity.public_key, ["s"])
        host = HostClient(nc, names, timeout=10)
        log_before = backend.log.stat().st_size
        messages_before = (await stream_state(nc, stream_name(names.name), 5)).messages
        origin = time.perf_counter()
        flood_start = origin + 2.0
        flood_end = flood_start + flood_s
        until = flood_end + 120.0

        async def getter() -> None:
            while (now := time.perf_counter()) < until:
                outcome = await get_quietly(host, entity_jwt, host_jwt)
                gets.at.append(now)
                gets.latency.append(time.perf_counter() - now)
                gets.ok.append(outcome == "ok")
                fast = outcome == "ok" and gets.latency[-1] < 1.0
                if now > flood_end + 10.0 and fast:
                    return  # recovered, and watched for 10 s after the flood

        async def flood(client: NATS) -> None:
            nonlocal published
            await anyio.sleep(flood_start - time.perf_counter())
            subject = f"{events_subject_prefix(names.name)}.{suffix}"
            while time.perf_counter() < flood_end:
                for _ in range(500):
                    await client.publish(subject, b"junk")
                published += 500
                await client.flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            tg.start_soon(flood, flooder)
        log_after = backend.log.stat().st_size
        messages_after = (await stream_state(nc, stream_name(names.name), 5)).messages
        recovered = next(
            (
                round(t - flood_end, 2)
                for t, ok, lat in zip(gets.at, gets.ok, gets.latency, strict=True)
                if t >= flood_end and ok and lat < 1.0
            ),
            None,
        )
        rejection_us = await rejection_cost(nc, backend)
    finally:
        await flooder.close()
        await nc.close()
        stop(backend)
    restart_floor_s = await restart_time(url, directory, floor)
    restart_s = await restart_time(url, directory, backend)
    repaired = await repair(url, backend)
    restart_repaired_s = await restart_time(url, directory, backend)
    before = gets.window(origin, flood_start)
    during = gets.window(flood_start, flood_end)
    floor, flooded = before["median_ms"], during["median_ms"]
    return {
        "flood_s": flood_s,
        "subject_suffix": suffix,
        "junk_published": published,
        "log_messages_before": messages_before,
        "log_messages_after": messages_after,
        "before": before,
        "during": during,
        "after_0_2s": gets.window(flood_end, flood_end + 2),
        "after_2_10s": gets.window(flood_end + 2, flood_end + 10),
        "after_10s": gets.window(flood_end + 10, until),
        "first_fast_get_after_flood_s": recovered,
        "stall_after_to_flood_ratio": None if recovered is None else round(recovered / flood_s, 2),
        "during_to_before_median_ratio": (
            round(flooded / floor, 1) if floor and flooded is not None else None
        ),
        "log_bytes_before": log_before,
        "log_bytes_after": log_after,
        "reject_one_entry_us": rejection_us,  # untagged / with a forged tag
        "restart_unflooded_s": restart_floor_s,
        "restart_after_flood_s": restart_s,
        "restart_ratio": round(restart_s / restart_floor_s, 1) if restart_floor_s else None,
        **repaired,
        "restart_after_repair_s": restart_repaired_s,
    }


async def repair(url: str, backend: Backend) -> dict[str, Any]:
    """`secrets-nats-kv repair` over the flooded log (stopped): its time and its line."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
    env.update(PYTHONPATH=str(REPO), ENCRYPTION_XKEY_SEED=backend.encryption.seed)
    command = [sys.executable, "-m", "secrets_nats_kv.app.cli", "repair", "--reason", "bench"]
    command += ["--nats-address", url, "--name", backend.names.name]
    command += ["-b", backend.names.secrets_bucket]
    started = time.perf_counter()
    done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    seconds = round(time.perf_counter() - started, 2)
    nc = await connect(NatsOptions(servers=(url,)), name="bench", persistent=False)
    try:
        messages = (await stream_state(nc, stream_name(backend.names.name), 5)).messages
    finally:
        await nc.close()
    said = (done.stdout or done.stderr).decode().strip()
    return {"repair_s": seconds, "repair_said": said, "log_messages_after_repair": messages}


async def rejection_cost(nc: NATS, backend: Backend) -> dict[str, float]:
    """Judging one junk entry as the backend does: the entry-tag check, then the fold's
    no-op; untagged (refused on the missing header) and with a made-up tag (an HMAC)."""
    codec = EventCodec(Barrier(backend.encryption))
    costs: dict[str, float] = {}
    for kind, headers in (("untagged", None), ("forged_tag", {ENTRY_TAG_HEADER: "0" * 64})):
        state = ViewState()
        rounds = 20_000
        started = time.perf_counter()
        for seq in range(1, rounds + 1):
            if not codec.authentic(seq, b"junk", headers):
                fold(state, seq, Rejected(reason="not tagged by our key"))
        costs[kind] = round((time.perf_counter() - started) / rounds * 1e6, 2)
    return costs


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        server = NatsServer(NatsServerConfig.in_dir(directory / "nats", server_name="bench"))
        server.start()
        try:
            count = 600 if args.quick else 6000
            results: dict[str, Any] = {}
            if args.only in (None, "tokens"):
                results["tokens_64k_trusted_issuer"] = await token_attack(
                    server.url, directory, count, trusted=True
                )
                results["tokens_at_limit_no_trusted_issuer"] = await token_attack(
                    server.url, directory, count, trusted=False
                )
            if args.only in (None, "flood"):
                flood_s = 1.0 if args.quick else 5.0
                results["junk_flood_other_subject"] = await junk_flood(
                    server.url, directory, flood_s, "junk"
                )
                results["junk_flood_event_subject"] = await junk_flood(
                    server.url, directory, flood_s, "secret.junk"
                )
            return results
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("tokens", "flood"), default=None)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "abuse.json"))
    args = parser.parse_args()
    results = anyio.run(run, args)
    text = json.dumps(results, indent=2)
    print(text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")


if __name__ == "__main__":
    main()
