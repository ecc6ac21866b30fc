"""The responders under test: the echo floor, the original's direct KV reads, and ours
(`secrets-nats-kv run` as real processes), each started and stopped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.fixtures import (
    REPO,
)
from bench.load import (
    proc_rss_bytes,
)
from secrets_nats_kv import wire
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import InvalidEntityJWT, InvalidJWT, ProtocolError, Unauthorized
from secrets_nats_kv.jwt import _verified, verify_entity_jwt, verify_host_jwt
from secrets_nats_kv.wire import RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import SealBox, XKey

_SPAWN = multiprocessing.get_context("spawn")
PIDS_STARTED: set[int] = set()  # the `run` processes this bench started (own sessions)


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
    from actors.gate import sender_key  # the same header checks as ours

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
        PIDS_STARTED.add(self.process.pid)
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
    PIDS_STARTED.discard(process.pid)
