"""Fault injection on a 3-node cluster: no acknowledged write is lost, reads come back.

Two real `secrets-nats-kv run --replicas 3` processes serve a steady load of puts and
gets while nodes (the event stream's leader among them, and a node a backend is
connected to) are SIGKILLed and restarted, and one backend process is SIGKILLed and
restarted. A backend is given every node's URL: it must outlive the node it is on, and
nats-py shuffles the list anyway, so which node it lands on is found out (monitoring
`/connz`) rather than assumed.

What is checked afterwards is what an operator relies on: every acknowledged put is
readable at its revision with its value, no revision was handed out twice, revisions
grow in acknowledgement order, no get ever returned a wrong value or an error other than
"no answer" / `UpstreamError`, none returned a stale one outside a fault, mappings are
intact, and gets come back within a bound after every fault.
"""

from __future__ import annotations

import itertools
import json
import secrets
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from events.access import access_stream_name
from events.log import stream_name
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import (
    BackendNotAnswering,
    NatsUnavailable,
    StorageError,
    UpstreamError,
)
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from support.cluster import NatsCluster
from support.harness import Identity, Keys, cli_env, spawn_run
from support.host import HostClient

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

NAMES = BackendNames()
SECRET_NAMES = ("db-password", "api-token", "tls-key", "webhook")
STREAMS = (
    stream_name(NAMES.name),
    f"KV_{NAMES.secrets_bucket}",
    f"KV_{NAMES.state_bucket}",
    access_stream_name(NAMES.name),
)
BACKEND_CONNECTION = f"secrets-nats-kv {NAMES.name}"  # the name `run` connects with

GET_TIMEOUT = 5.0  # a host gives up on one request after this (HostClient's default)
GET_PACE = 0.02  # seconds between gets of one worker: a steady load, not a flood
PUT_PACE = 0.05
PUT_DEADLINE = 60.0  # one put (retried with the same request id) must be acked by then
# The longest time without a successful get, and the time until gets stop failing after a
# fault. What it should take: a Raft election (~4 s) when a leader dies, a reconnect
# (<1 s), and a backend noticing that its event log consumer lost messages or vanished;
# while the log's head is unreadable a backend waits 3 s, then serves its view as it
# stands. Measured on 2 busy cores with the log consumer's idle heartbeat at 1 s: longest
# outage 3.0-5.5 s, last failed get <= 5.1 s after a fault (12 runs); 10 s is about twice
# that. With nats-py's default 5 s heartbeat a backend whose node dies stalls 10-20 s
# (measured: outage up to 19 s, failures until 10-18 s after the fault), and this test
# fails: see the report on events/log.py.
OUTAGE_BOUND = 10.0
RECOVERY_DEADLINE = 30.0  # waiting for a recovery that never comes fails here, not at 300 s
CURRENT_DEADLINE = 30.0
# Failures a host may see while a fault lasts (the get workers record exactly these by
# name, and the put workers retry exactly these); anything else (Unauthorized,
# SecretNotFound, a wrong value) is a wrong answer.
TRANSIENT_ERRORS = (BackendNotAnswering, UpstreamError, NatsUnavailable, StorageError)
TRANSIENT = frozenset(error.__name__ for error in TRANSIENT_ERRORS)


@dataclass(frozen=True)
class Ack:
    name: str
    revision: int
    value: str
    sent: float
    acked: float


@dataclass(frozen=True)
class GetRecord:
    started: float
    ended: float
    name: str
    version: int | None = None
    value: str | None = None
    error: str | None = None


@dataclass
class Fault:
    label: str
    at: float
    get_recovery: float = float("nan")  # to the first get that succeeded
    put_recovery: float = float("nan")  # to the first put acknowledged
    settled: float = 0.0  # to the end of the last get that failed before the next fault


@dataclass
class Load:
    """The steady load and everything it observed, for the checks afterwards."""

    keys: Keys
    identity: Identity
    acks: list[Ack] = field(default_factory=list)
    attempted: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    gets: list[GetRecord] = field(default_factory=list)
    put_retries: int = 0
    stop: anyio.Event = field(default_factory=anyio.Event)
    progress: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.entity_jwt = self.identity.entity_jwt()
        self.host_jwt = self.identity.host_jwt()

    def _tick(self) -> None:
        self.progress.set()
        self.progress = anyio.Event()

    async def put_acked(self, admin: AdminClient, name: str, value: str) -> int:
        """Put until acknowledged, always with the same request id: a retry lands once."""
        body = wire.encode_put_request(
            wire.AdminPutSecretRequest(
                key=name,
                string_secret=value,
                request_id=uuid.uuid4().hex,
                issued_at=int(time.time()),
                operation="put_secret",
            )
        )
        sealed = admin.admin_key.seal(body, self.keys.transit.public_key)
        headers = {HOST_XKEY_HEADER: admin.admin_key.public_key}
        self.attempted[name].add(value)
        with anyio.fail_after(PUT_DEADLINE):
            while True:
                try:
                    data, _ = await admin.request("put_secret", sealed, headers)
                    return wire.decode_put_response(data).result()
                except TRANSIENT_ERRORS:
                    pass  # no answer, or "not stored / not yet served": ask again
                self.put_retries += 1
                await anyio.sleep(0.1)  # back off, then resend the very same request

    async def put_worker(self, nc: NATS, worker: int, names: tuple[str, ...]) -> None:
        admin = AdminClient(nc, NAMES, self.keys.transit, timeout=GET_TIMEOUT, retries=0)
        count = 0
        while not self.stop.is_set():
            name = names[count % len(names)]
            value = f"w{worker}-{count}-{secrets.token_hex(4)}"
            sent = time.monotonic()
            revision = await self.put_acked(admin, name, value)
            self.acks.append(Ack(name, revision, value, sent, time.monotonic()))
            self._tick()
            count += 1
            await anyio.sleep(PUT_PACE)

    async def get_worker(self, nc: NATS, worker: int) -> None:
        host = HostClient(nc, NAMES, timeout=GET_TIMEOUT)
        count = worker
        while not self.stop.is_set():
            name = SECRET_NAMES[count % len(SECRET_NAMES)]
            count += 1
            started = time.monotonic()
            try:
                secret = await host.get(name, entity_jwt=self.entity_jwt, host_jwt=self.host_jwt)
            except TRANSIENT_ERRORS as exc:
                record = GetRecord(started, time.monotonic(), name, error=type(exc).__name__)
            except Exception as exc:  # recorded, judged after the run
                record = GetRecord(started, time.monotonic(), name, error=repr(exc))
            else:
                record = GetRecord(
                    started, time.monotonic(), name, int(secret.version), secret.string_secret
                )
            self.gets.append(record)
            self._tick()
            await anyio.sleep(GET_PACE)

    async def recovered(self, since: float) -> tuple[float, float]:
        """Seconds from `since` to the first get that succeeded, and to the first put acked,
        among requests sent after `since` (waits for both, on the load's own progress)."""
        with anyio.fail_after(RECOVERY_DEADLINE):
            while True:
                get_ok = next(
                    (g.ended for g in self.gets if g.started > since and g.error is None), None
                )
                put_ok = next((a.acked for a in self.acks if a.sent > since), None)
                if get_ok is not None and put_ok is not None:
                    return get_ok - since, put_ok - since
                await self.progress.wait()


async def add_mapping(admin: AdminClient, entity: str, names: list[str]) -> None:
    """Grant, retrying on `UpstreamError` as an admin is told to (granting is idempotent).

    Two backends writing a fresh R3 bucket at once can refuse a write that did land (see
    the report on projections/kv.py); the grant itself is in the log either way.
    """
    with anyio.fail_after(RECOVERY_DEADLINE):
        while True:
            try:
                return await admin.add_mapping(entity, names)
            except UpstreamError:
                await anyio.sleep(0.1)  # back off, then ask again


# --- cluster inspection -----------------------------------------------------------------


async def stream_leader(js: JetStreamContext, cluster: NatsCluster) -> int:
    """Index of the node leading the event stream (waits out an election, bounded)."""
    names = [server.name for server in cluster.servers]
    with anyio.fail_after(RECOVERY_DEADLINE):
        while True:
            try:
                info = await js.stream_info(STREAMS[0])
                leader = info.cluster.leader if info.cluster else None
                if leader in names:
                    return names.index(leader)
            except (nats.errors.Error, nats.js.errors.Error):
                pass
            await anyio.sleep(0.1)  # no event announces a new leader to a client: poll


async def all_current(js: JetStreamContext, size: int) -> None:
    """Wait until every stream has a leader and all its followers are current again.

    A restarted node is healthy before its replicas have caught up; killing a second
    node before then would take quorum away for reasons the test did not intend.
    """
    with anyio.fail_after(CURRENT_DEADLINE):
        while True:
            done = 0
            for stream in STREAMS:
                try:
                    info = await js.stream_info(stream)
                except (nats.errors.Error, nats.js.errors.Error):
                    break
                cl = info.cluster
                if cl is None or cl.leader is None or cl.replicas is None:
                    break
                if len(cl.replicas) != size - 1 or not all(
                    p.current and not p.offline for p in cl.replicas
                ):
                    break
                done += 1
            if done == len(STREAMS):
                return
            await anyio.sleep(0.2)  # replica catch-up announces nothing to clients: poll


async def consumer_node(js: JetStreamContext, cluster: NatsCluster) -> int:
    """The node holding most consumers of the event stream (the backends' followers)."""
    names = [server.name for server in cluster.servers]
    infos = await js.consumers_info(STREAMS[0])
    hosts = [names.index(c.cluster.leader) for c in infos if c.cluster and c.cluster.leader]
    assert hosts, "no consumer on the event stream"
    return max(set(hosts), key=hosts.count)


def backend_nodes(cluster: NatsCluster) -> dict[int, int]:
    """Running node index -> number of backend connections on it (from `/connz`)."""
    found: dict[int, int] = {}
    for index, server in enumerate(cluster.servers):
        if not server.running:
            continue
        url = f"{server.config.monitor_url}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5) as reply:
            connz = json.load(reply)
        count = sum(
            1 for c in connz.get("connections") or () if c.get("name") == BACKEND_CONNECTION
        )
        if count:
            found[index] = count
    return found


async def count_instances(nc: NATS) -> int:
    """How many backend instances answer `$SRV.PING` (each answers once when ready)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish("$SRV.PING.secrets-nats-kv", b"", reply=inbox)
        seen: set[str] = set()
        with anyio.move_on_after(0.5):  # a scatter-gather has no "last reply" event
            async for msg in sub.messages:
                if msg.data:  # not the empty "no responders" status
                    seen.add(json.loads(msg.data)["id"])
        return len(seen)
    finally:
        await sub.unsubscribe()


async def wait_instances(nc: NATS, count: int) -> None:
    with anyio.fail_after(RECOVERY_DEADLINE):
        while await count_instances(nc) != count:
            pass


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and SIGKILL if it does not exit in 10 s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# --- the checks ---------------------------------------------------------------------------


def longest_gap(load: Load, start: float, end: float) -> float:
    """The longest time without a successful get between `start` and `end`."""
    ok = sorted(g.ended for g in load.gets if g.error is None and start <= g.ended <= end)
    points = [start, *ok, end]
    return max(b - a for a, b in itertools.pairwise(points))


def check_acks(load: Load) -> None:
    revisions = [a.revision for a in load.acks]
    assert len(set(revisions)) == len(revisions), "a revision was acknowledged twice"
    by_name: dict[str, list[Ack]] = defaultdict(list)
    for ack in sorted(load.acks, key=lambda a: a.acked):
        by_name[ack.name].append(ack)
    for name, acks in by_name.items():
        order = [a.revision for a in acks]
        assert order == sorted(order), f"{name}: revisions not increasing in ack order"


def check_gets(load: Load, faults: list[Fault]) -> int:
    """No wrong answer ever; no stale answer outside fault windows. Returns stale reads.

    While a backend cannot read the log's head it serves the view as it stands
    (projections/live.py), which may miss writes acknowledged just before the fault; so
    read-your-writes is demanded only of gets sent outside [fault, fault + OUTAGE_BOUND].
    """
    wrong = [g for g in load.gets if g.error is not None and g.error not in TRANSIENT]
    assert not wrong, f"gets answered wrongly: {wrong[:5]}"
    acked = {(a.name, a.revision): a for a in load.acks}
    stale = 0
    for g in load.gets:
        if g.error is not None:
            continue
        assert g.version is not None
        ack = acked.get((g.name, g.version))
        if ack is not None:
            assert g.value == ack.value, f"{g.name} v{g.version}: not the acknowledged value"
        else:  # stored, its ack not yet received: must still be one of ours
            assert g.value in load.attempted[g.name], f"{g.name} v{g.version}: unknown value"
        newest = max(
            (a.revision for a in load.acks if a.name == g.name and a.acked < g.started),
            default=0,
        )
        if g.version >= newest:
            continue
        stale += 1
        in_fault = any(f.at <= g.started <= f.at + OUTAGE_BOUND for f in faults)
        assert in_fault, f"{g.name}: stale v{g.version} after v{newest} was acked, no fault"
    return stale


async def read_back_all(load: Load, host: HostClient) -> list[Ack]:
    """Every acknowledged put, read through `get` at its revision; those not found."""
    lost: list[Ack] = []
    limiter = anyio.CapacityLimiter(16)

    async def one(ack: Ack) -> None:
        async with limiter:
            try:
                secret = await host.get(
                    ack.name,
                    entity_jwt=load.entity_jwt,
                    host_jwt=load.host_jwt,
                    version=str(ack.revision),
                )
            except Exception:
                lost.append(ack)
                return
            if (int(secret.version), secret.string_secret) != (ack.revision, ack.value):
                lost.append(ack)

    async with anyio.create_task_group() as tg:
        for ack in load.acks:
            tg.start_soon(one, ack)
    return lost


def backend_logs(directory: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in directory.glob("backend-*.log"))


# --- the test -------------------------------------------------------------------------------


@pytest.fixture
def backends() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Backend processes the test starts; whatever is left running is stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_process(proc)


async def test_faults_lose_no_acknowledged_write(
    nats_cluster: NatsCluster, backends: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """What replicas are for: a fault costs seconds of availability, never a write that
    was acknowledged, never a wrong answer."""
    began = time.monotonic()
    keys = Keys()
    env = cli_env(keys)
    address = nats_cluster.url  # every node: a backend must outlive the node it is on

    def start_backend(label: str) -> subprocess.Popen[bytes]:
        proc = spawn_run(address, env, "--replicas", "3", log=tmp_path / f"{label}.log")
        backends.append(proc)
        return proc

    options = NatsOptions(servers=tuple(nats_cluster.urls))
    nc_a = await connect(options, name="test load a", persistent=True)
    nc_b = await connect(options, name="test load b", persistent=True)
    try:
        first = start_backend("backend-a")
        start_backend("backend-b")
        await wait_instances(nc_a, 2)
        js = nc_a.jetstream(timeout=2)
        await all_current(js, len(nats_cluster))

        identity = Identity()
        load = Load(keys, identity)
        admin = AdminClient(nc_a, NAMES, keys.transit)
        for name in SECRET_NAMES:
            value = f"initial-{secrets.token_hex(4)}"
            load.acks.append(Ack(name, await load.put_acked(admin, name, value), value, 0.0, 0.0))
        await add_mapping(admin, identity.entity_key, list(SECRET_NAMES))
        bystander = Identity()  # a mapping no one touches during the run must survive it
        await add_mapping(admin, bystander.entity_key, [SECRET_NAMES[0]])
        attached = backend_nodes(nats_cluster)
        assert sum(attached.values()) == 2, attached

        faults: list[Fault] = []

        async def inject(label: str, action: Callable[[], object]) -> None:
            fault = Fault(label, time.monotonic())
            await anyio.to_thread.run_sync(action)
            faults.append(fault)
            fault.get_recovery, fault.put_recovery = await load.recovered(fault.at)

        async def kill_node(label: str, index: int) -> None:
            await inject(f"kill n{index} ({label})", lambda: nats_cluster.kill(index))
            await anyio.to_thread.run_sync(lambda: nats_cluster.restart(index))
            await all_current(js, len(nats_cluster))

        load_start = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.put_worker, nc_a, 0, SECRET_NAMES[:2])
            tg.start_soon(load.put_worker, nc_b, 1, SECRET_NAMES[2:])
            tg.start_soon(load.get_worker, nc_a, 0)
            tg.start_soon(load.get_worker, nc_b, 1)
            await load.recovered(load_start)  # the load is flowing

            # 1. The event stream's leader dies: a Raft election, no append meanwhile.
            await kill_node("event stream leader", await stream_leader(js, nats_cluster))
            # 2. A node a backend is connected to (not the leader, when there is a choice):
            # the backend reconnects to another node and resubscribes.
            leader = await stream_leader(js, nats_cluster)
            hosts = backend_nodes(nats_cluster)
            target = max(hosts, key=lambda i: (i != leader, hosts[i]))
            await kill_node(f"{hosts[target]} backend connection(s)", target)
            # 3. A backend process dies mid-request; the other one carries on.
            await inject("SIGKILL backend a", first.kill)
            first.wait()
            restarted_at = time.monotonic()
            start_backend("backend-a-restarted")
            await wait_instances(nc_a, 2)
            backend_restart = time.monotonic() - restarted_at
            # 4. The node holding the backends' event log consumers (ephemeral, one
            # replica): each backend must notice its consumer is gone and make another.
            target = await consumer_node(js, nats_cluster)
            leader = await stream_leader(js, nats_cluster)
            label = "log consumers" + (", event stream leader" if target == leader else "")
            await kill_node(label, target)

            await load.recovered(time.monotonic())  # a last round of load, all healthy
            load.stop.set()
        load_end = time.monotonic()

        for i, fault in enumerate(faults):
            until = faults[i + 1].at if i + 1 < len(faults) else load_end
            failed = [g.ended for g in load.gets if g.error and fault.at <= g.ended < until]
            fault.settled = max(failed, default=fault.at) - fault.at
        lost = await read_back_all(load, HostClient(nc_b, NAMES, timeout=5.0))
        mappings = await admin.mappings()
        outage = longest_gap(load, load_start, load_end)
        failed_gets = sum(1 for g in load.gets if g.error is not None)

        print()
        print(f"backends attached to nodes {attached} (node: backend connections)")
        for fault in faults:
            print(
                f"fault {fault.label}: first get back after {fault.get_recovery:.2f} s, "
                f"last failed get {fault.settled:.2f} s after, "
                f"first put acked after {fault.put_recovery:.2f} s"
            )
        print(f"restarted backend answered PING after {backend_restart:.2f} s")
        print(
            f"faults injected: {len(faults)}; puts acknowledged: {len(load.acks)} "
            f"({load.put_retries} retries); lost: {len(lost)}; gets: {len(load.gets)} "
            f"({failed_gets} failed); longest get outage: {outage:.2f} s; "
            f"test took {time.monotonic() - began:.1f} s"
        )

        assert not lost, f"{len(lost)} acknowledged puts not readable, e.g. {lost[:3]}"
        check_acks(load)
        stale = check_gets(load, faults)
        print(f"stale gets (all within a fault window): {stale}")
        # Mappings: the load's identity read every secret, the bystander's is unchanged.
        assert sorted(mappings[identity.entity_key]) == sorted(SECRET_NAMES)
        assert mappings[bystander.entity_key] == [SECRET_NAMES[0]]
        assert len(faults) == 4
        assert outage < OUTAGE_BOUND
        for fault in faults:
            assert fault.get_recovery < OUTAGE_BOUND, fault
            assert fault.settled < OUTAGE_BOUND, fault
    finally:
        await nc_a.close()
        await nc_b.close()

    # Clean shutdown of both survivors, and no value or seed in what they logged.
    codes = [stop_process(proc) for proc in backends]
    assert codes == [-signal.SIGKILL, 0, 0]
    logged = backend_logs(tmp_path)
    for secret_text in (keys.transit.seed, keys.encryption.seed, load.entity_jwt, load.host_jwt):
        assert secret_text not in logged
    leaked = [v for values in load.attempted.values() for v in values if v in logged]
    assert not leaked, leaked
