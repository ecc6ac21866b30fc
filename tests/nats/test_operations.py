"""Operating the backend: shutdown, discovery, logs, trusted issuers, workers, readiness.

What an operator (or an orchestrator) relies on, checked on real `run` processes where
the behaviour is the process's own (signals, exit codes, stderr, child processes) and on
in-process backends where only the NATS side matters:

- SIGTERM under load exits 0 within seconds and leaves no accepted request unanswered;
- `$SRV.PING/INFO/STATS` find every instance, its endpoint and per-operation counts;
- `--log-format json` is one JSON object per line, `--log-level` filters, and no line
  carries a value, seed or JWT;
- `--trusted-issuer` / `TRUSTED_ISSUERS` refuse hosts of other accounts by name, and
  start-up warns when no issuer is trusted;
- `run --workers 3` supervises its children: restarts a killed one, stops all on SIGTERM;
- an instance answers PING only once its view has caught up with the log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.app.workers import supervise_children
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import (
    BackendNotAnswering,
    InvalidHostJWT,
    Unauthorized,
    UpstreamError,
)
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from support.harness import Identity, Keys, cli_env, running_backend, spawn_run
from support.host import HostClient
from support.tokens import mint_host_jwt

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
SERVICE = "secrets-nats-kv"
DEADLINE = 20.0  # any wait for an event that should come in well under a second or two
GETTERS = 16  # concurrent hosts: enough that requests are always in flight at SIGTERM


# --- helpers --------------------------------------------------------------------------------


async def gather(
    nc: NATS, subject: str, *, expect: int | None = None, window: float = 0.5
) -> list[dict[str, Any]]:
    """Scatter-gather on a `$SRV` subject: every reply within `window` (or `expect` ones).

    A discovery request has no "last reply" event, so the window bounds the wait; knowing
    how many to expect lets the usual case end as soon as they are all in.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        with anyio.move_on_after(window):
            async for msg in sub.messages:
                if msg.data:  # an empty message is the "no responders" status
                    replies.append(json.loads(msg.data))
                    if expect is not None and len(replies) >= expect:
                        break
    finally:
        await sub.unsubscribe()
    return replies


async def ping_ids(nc: NATS, expect: int | None = None) -> set[str]:
    return {reply["id"] for reply in await gather(nc, f"$SRV.PING.{SERVICE}", expect=expect)}


async def wait_ping(nc: NATS, predicate: Any, what: str) -> set[str]:
    """PING until the set of instance ids satisfies `predicate` (bounded)."""
    ids: set[str] = set()
    with anyio.move_on_after(DEADLINE):
        while True:
            ids = await ping_ids(nc)
            if predicate(ids):
                return ids
    raise AssertionError(f"{what}: not within {DEADLINE} s (last PING ids {sorted(ids)})")


async def client(url: str) -> NATS:
    return await connect(NatsOptions(servers=(url,)), name="test client", persistent=False)


def exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pid {proc.pid} still running after {timeout} s") from None


def children_of(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc: the parent's own view of its family)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Seeded:
    """A backend's clients with one mapped secret in place."""

    admin: AdminClient
    host: HostClient
    identity: Identity
    name: str
    value: str

    async def get(self) -> str | None:
        secret = await self.host.get(
            self.name, entity_jwt=self.identity.entity_jwt(), host_jwt=self.identity.host_jwt()
        )
        return secret.string_secret


async def seed(nc: NATS, keys: Keys, name: str = "db-password") -> Seeded:
    admin = AdminClient(nc, NAMES, keys.transit)
    identity = Identity()
    value = f"value-{secrets.token_hex(8)}"
    await admin.put_secret(name, value)
    await admin.add_mapping(identity.entity_key, [name])
    return Seeded(admin, HostClient(nc, NAMES), identity, name, value)


# --- SIGTERM ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    sent: float
    answered: bool
    value: str | None
    retried_ok: bool | None = None  # for a timed-out get: did the retry succeed?


async def test_sigterm_under_load_answers_what_it_took_and_exits_0(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A rolling restart must not fail hosts: what the leaving instance was given is
    answered; only requests sent after SIGTERM may go unanswered, and a retry lands on the
    instance that stays."""
    keys = Keys()
    env = cli_env(keys)
    leaving = spawn_run(nats_server.url, env, log=tmp_path / "leaving.log")
    staying = spawn_run(nats_server.url, env, log=tmp_path / "staying.log")
    processes += [leaving, staying]
    nc = await client(nats_server.url)
    try:
        await wait_ping(nc, lambda ids: len(ids) == 2, "two instances")
        seeded = await seed(nc, keys)
        attempts: list[Attempt] = []
        stop = anyio.Event()
        progress = anyio.Event()

        async def getter() -> None:
            nonlocal progress
            host = HostClient(nc, NAMES, timeout=1.0)
            entity_jwt, host_jwt = seeded.identity.entity_jwt(), seeded.identity.host_jwt()
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    secret = await host.get(seeded.name, entity_jwt=entity_jwt, host_jwt=host_jwt)
                    attempts.append(Attempt(sent, True, secret.string_secret))
                except BackendNotAnswering:
                    try:  # what a host does: ask again; only the staying instance is left
                        retry = await host.get(
                            seeded.name, entity_jwt=entity_jwt, host_jwt=host_jwt
                        )
                        ok = retry.string_secret == seeded.value
                    except BackendNotAnswering:
                        ok = False
                    attempts.append(Attempt(sent, False, None, ok))
                progress.set()
                progress = anyio.Event()

        async def answered(count: int) -> None:
            with anyio.fail_after(DEADLINE):
                while len(attempts) < count:
                    await progress.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(GETTERS):
                tg.start_soon(getter)
            await answered(200)  # a steady stream is flowing through both instances
            terminated = time.monotonic()
            leaving.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(exit_code, leaving, 10.0)
            exited = time.monotonic()
            await answered(len(attempts) + 200)  # and flows on through the other one
            stop.set()

        assert code == 0
        assert exited - terminated < 5.0
        assert all(a.value == seeded.value for a in attempts if a.answered), "a wrong answer"
        lost = [a for a in attempts if not a.answered]
        early = [round(a.sent - terminated, 3) for a in lost if a.sent < terminated]
        assert not early, f"gets sent before SIGTERM (s before it: {early}) were never answered"
        assert all(a.retried_ok for a in lost), "a retry against the other instance failed"
        assert len(await ping_ids(nc, expect=1)) == 1
        print(
            f"\nSIGTERM: exit 0 after {exited - terminated:.2f} s; "
            f"{len(attempts)} gets, {len(lost)} timed out (all retried fine)"
        )
    finally:
        await nc.close()
    assert "stopping: draining requests in flight" in (tmp_path / "leaving.log").read_text()


# --- discovery --------------------------------------------------------------------------------


def get_requests(stats: list[dict[str, Any]]) -> int:
    """Sum over instances of the `get` count in each STATS reply's endpoint data."""
    total = 0
    for reply in stats:
        (endpoint,) = reply["endpoints"]
        total += endpoint["data"]["operations"].get("get", {}).get("requests", 0)
    return total


async def test_micro_service_discovery_finds_every_instance(nats_server: NatsServer) -> None:
    """`nats micro ls/info/stats` is how an operator sees the fleet and its load."""
    keys = Keys()
    async with (
        running_backend(nats_server.url, keys) as first,
        running_backend(nats_server.url, keys),
    ):
        nc = first.admin.nc
        ids = await ping_ids(nc, expect=2)
        assert len(ids) == 2

        infos = await gather(nc, f"$SRV.INFO.{SERVICE}", expect=2)
        assert {info["id"] for info in infos} == ids
        for info in infos:
            assert info["name"] == SERVICE
            (endpoint,) = info["endpoints"]
            assert endpoint["subject"] == "wasmcloud.secrets.v1alpha1.nats-kv.>"
            assert endpoint["queue_group"] == "wasmcloud_secrets.nats-kv"

        seeded = await seed(nc, keys)
        before = get_requests(await gather(nc, f"$SRV.STATS.{SERVICE}", expect=2))
        gets = 25
        for _ in range(gets):
            assert await seeded.get() == seeded.value
        stats = await gather(nc, f"$SRV.STATS.{SERVICE}", expect=2)
        assert len(stats) == 2
        assert get_requests(stats) - before == gets
        # Both instances took part: the queue group spreads requests.
        assert all(get_requests([reply]) > 0 for reply in stats)


# --- logs -------------------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines, "no log lines"
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object, nothing else
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        parsed.append(record)
    return parsed


async def test_json_logs_levels_and_no_secret_in_any_line(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Log pipelines parse every line; logs are kept and shipped, so nothing secret in them."""
    keys = Keys()
    admin_key = Keys().transit  # a second admin key, whose seed must not leak either
    env = cli_env(keys, ADMIN_XKEYS=admin_key.public_key)
    chatty, quiet = tmp_path / "info.log", tmp_path / "warning.log"
    processes.append(spawn_run(nats_server.url, env, "--log-format", "json", log=chatty))
    processes.append(
        spawn_run(nats_server.url, env, "--log-format", "json", "--log-level", "warning",
                  log=quiet)
    )  # fmt: skip
    nc = await client(nats_server.url)
    try:
        await wait_ping(nc, lambda ids: len(ids) == 2, "two instances")
        seeded = await seed(nc, keys)
        other = AdminClient(nc, NAMES, admin_key)
        values = [seeded.value]
        for index in range(10):
            values.append(f"v{index}-{secrets.token_hex(6)}")
            await other.put_secret(seeded.name, values[-1])
            assert await seeded.get() == values[-1]
        # Refusals go through the logging paths too.
        stranger = Identity()
        for _ in range(4):
            with pytest.raises(Unauthorized):
                await seeded.host.get(
                    seeded.name, entity_jwt=stranger.entity_jwt(), host_jwt=stranger.host_jwt()
                )
        jwts = [seeded.identity.entity_jwt(), seeded.identity.host_jwt(), stranger.host_jwt()]
    finally:
        await nc.close()
    for proc in processes:
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(exit_code, proc, 10.0) == 0

    info, warning = json_lines(chatty), json_lines(quiet)
    assert any(r["level"] == "info" and r["message"] == "backend ready" for r in info)
    assert {r["level"] for r in warning} <= {"warning", "error", "critical"}
    for records in (info, warning):
        assert any("no --trusted-issuer" in r["message"] for r in records)
    text = chatty.read_text() + quiet.read_text()
    for secret_text in (keys.transit.seed, keys.encryption.seed, admin_key.seed, *values, *jwts):
        assert secret_text not in text, "secret material in a log line"
    # Not even a JWT's signed part: the claims segment alone identifies the token.
    assert not any(token.split(".")[1] in text for token in jwts)


# --- trusted issuers --------------------------------------------------------------------------


async def test_trusted_issuers_refuse_other_accounts_by_name(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """TRUSTED_ISSUERS (comma-separated, spaces tolerated) is the only thing keeping a
    self-made host JWT out; the refusal names the issuer so an operator can fix it."""
    keys = Keys()
    ours, partner, stranger = (SigningKey.generate(Role.ACCOUNT) for _ in range(3))
    log = tmp_path / "run.log"
    env = cli_env(keys, TRUSTED_ISSUERS=f" {ours.public_key} ,{partner.public_key}")
    processes.append(spawn_run(nats_server.url, env, log=log))
    nc = await client(nats_server.url)
    try:
        await wait_ping(nc, lambda ids: len(ids) == 1, "the instance")
        identity = Identity(account=ours)
        admin = AdminClient(nc, NAMES, keys.transit)
        await admin.put_secret("db-password", "sup3rs3cr3t")
        await admin.add_mapping(identity.entity_key, ["db-password"])
        host = HostClient(nc, NAMES)

        async def get_with_host_issuer(issuer: SigningKey) -> str | None:
            secret = await host.get(
                "db-password",
                entity_jwt=identity.entity_jwt(),
                host_jwt=mint_host_jwt(issuer, identity.host.public_key),
            )
            return secret.string_secret

        assert await get_with_host_issuer(ours) == "sup3rs3cr3t"
        assert await get_with_host_issuer(partner) == "sup3rs3cr3t"  # the second env entry
        with pytest.raises(InvalidHostJWT) as refused:
            await get_with_host_issuer(stranger)
        assert stranger.public_key in refused.value.text
        assert "not a trusted issuer" in refused.value.text
    finally:
        await nc.close()
    processes[0].send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(exit_code, processes[0], 10.0) == 0
    assert "no --trusted-issuer" not in log.read_text()


async def test_trusted_issuer_flag_refuses_a_host_of_another_account(
    nats_server: NatsServer,
) -> None:
    """The flag's form, in process: the responder names the issuer it does not trust."""
    keys = Keys()
    ours, stranger = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.ACCOUNT)
    async with running_backend(
        nats_server.url, keys, trusted_issuers=(ours.public_key,)
    ) as backend:
        identity = Identity(account=ours)
        await backend.admin.put_secret("api-token", "t0ken")
        await backend.admin.add_mapping(identity.entity_key, ["api-token"])
        assert (await backend.get(identity, "api-token")).string_secret == "t0ken"
        with pytest.raises(InvalidHostJWT, match=stranger.public_key):
            await backend.host.get(
                "api-token",
                entity_jwt=identity.entity_jwt(),
                host_jwt=mint_host_jwt(stranger, identity.host.public_key),
            )


# --- run --workers ---------------------------------------------------------------------------


async def test_workers_are_supervised_restarted_and_stopped(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """One `run --workers 3` is one unit for an orchestrator: it heals its children and
    takes them all down with it."""
    keys = Keys()
    parent = spawn_run(nats_server.url, cli_env(keys), "--workers", "3", log=tmp_path / "w.log")
    processes.append(parent)
    nc = await client(nats_server.url)
    try:
        first_ids = await wait_ping(nc, lambda ids: len(ids) == 3, "three instances")
        children = children_of(parent.pid)
        assert len(children) == 2, children  # the parent serves too
        victim = min(children)
        os.kill(victim, signal.SIGKILL)
        ids = await wait_ping(
            nc, lambda ids: len(ids) == 3 and ids != first_ids, "a restarted instance"
        )
        assert len(ids - first_ids) == 1  # one new instance, in place of the killed one
        now = children_of(parent.pid)
        assert victim not in now
        assert len(now) == 2
        seeded = await seed(nc, keys)
        for _ in range(10):
            assert await seeded.get() == seeded.value
    finally:
        await nc.close()
    parent.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(exit_code, parent, 15.0) == 0
    left = [pid for pid in children | now if alive(pid)]
    assert not left, f"children still running after the parent stopped: {left}"


async def test_workers_stop_when_their_supervisor_is_killed(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A SIGKILLed `run --workers` cannot stop its children; they notice and stop themselves."""
    keys = Keys()
    parent = spawn_run(nats_server.url, cli_env(keys), "--workers", "3", log=tmp_path / "k.log")
    processes.append(parent)
    children: set[int] = set()
    nc = await client(nats_server.url)
    try:
        await wait_ping(nc, lambda ids: len(ids) == 3, "three instances")
        children = children_of(parent.pid)
        assert len(children) == 2, children
        parent.kill()
        await anyio.to_thread.run_sync(parent.wait)
        await wait_ping(nc, lambda ids: len(ids) == 0, "no instance left")
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in children):  # exiting is not announced: bounded poll
            assert time.monotonic() < deadline, "orphaned workers kept running"
            await anyio.sleep(0.05)
    finally:
        await nc.close()
        for pid in children:  # never leave them behind, even when the test fails
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_cancelled_supervisor_leaves_no_child_running(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the parent's own backend fails, its task group cancels the supervisor: the
    children must be stopped with it, not left serving with no one to stop them."""
    for name, value in Keys().env().items():  # children inherit this process's environment
        monkeypatch.setenv(name, value)
    argv = ["run", "--nats-address", nats_server.url, "--log-level", "error"]
    before = children_of(os.getpid())
    spawned: set[int] = set()
    nc = await client(nats_server.url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise_children, argv, 2, anyio.Event())
            await wait_ping(nc, lambda ids: len(ids) == 2, "two children")
            spawned = children_of(os.getpid()) - before
            tg.cancel_scope.cancel()
        assert len(spawned) == 2
        left = [pid for pid in spawned if alive(pid)]
        assert not left, f"children still running after their supervisor was cancelled: {left}"
    finally:
        await nc.close()
        for pid in spawned:  # never leave them behind, even when the test fails
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- readiness -------------------------------------------------------------------------------


async def test_first_ping_comes_after_catching_up_with_the_log(
    nats_server: NatsServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """PING is the readiness probe: an instance that answers it must already serve the
    newest state, even over a log of 500 events."""
    keys = Keys()
    events = 500
    identity = Identity()
    last_value = ""
    async with running_backend(nats_server.url, keys, access_log=False) as writer:
        limiter = anyio.CapacityLimiter(8)

        async def put(index: int) -> None:
            async with limiter:
                for _ in range(5):
                    try:
                        await writer.admin.put_secret(f"s{index % 20}", f"v{index}")
                        return
                    except UpstreamError:  # "the log kept changing": concurrent admins retry
                        continue
                raise AssertionError(f"put {index} kept losing the race for the log")

        async with anyio.create_task_group() as tg:
            for index in range(events - 2):
                tg.start_soon(put, index)
        last_value = f"last-{secrets.token_hex(6)}"
        await writer.admin.put_secret("last", last_value)
        await writer.admin.add_mapping(identity.entity_key, ["last"])  # event number 500

    log = tmp_path / "run.log"
    processes.append(spawn_run(nats_server.url, cli_env(keys), "--log-format", "json", log=log))
    nc = await client(nats_server.url)
    try:
        with anyio.fail_after(DEADLINE):
            while not await ping_ids(nc, expect=1):
                pass
        host = HostClient(nc, NAMES, timeout=1.0)
        started = time.monotonic()
        secret = await host.get(
            "last", entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt()
        )
        took = time.monotonic() - started
    finally:
        await nc.close()
    assert secret.string_secret == last_value
    assert took < 1.0
    ready = [r for r in json_lines(log) if r["message"] == "backend ready"]
    assert [r["events"] for r in ready] == [events]


# --- what an admin is told when storage is down -------------------------------------------------


def test_a_put_refused_for_lack_of_storage_reads_as_upstream_error() -> None:
    """The backend answers a put it could not store with `"error":"UpstreamError"` (a
    text variant sent as its bare name); the admin client must turn that back into
    `UpstreamError` (retryable) rather than `Other: unrecognised error value`."""
    reply = wire.encode_put_response(0, UpstreamError("append: JetStream is not available"))
    assert json.loads(reply) == {"revision": 0, "error": "UpstreamError"}
    with pytest.raises(UpstreamError):
        wire.decode_put_response(reply).result()
