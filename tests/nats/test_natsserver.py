"""The test harness itself, against real nats-server processes: start, durability across
restarts and crashes, port clashes, bad configs, a 3-node cluster losing its stream leader,
and nkey authorization."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamInfo

from secrets_nats_kv import nkeys
from secrets_nats_kv.app.natsserver import (
    ClusterConfig,
    NatsServer,
    NatsServerConfig,
    free_port,
    nats_server_binary,
    port_in_use,
)
from secrets_nats_kv.errors import NatsUnavailable
from support.cluster import NatsCluster

if TYPE_CHECKING:
    from conftest import MakeNatsServer, NkeyAuthServer

STREAM = "HARNESS"
SUBJECT = "harness.events"
T = TypeVar("T")
POLL_DEADLINE = 30.0


async def connect(*urls: str, **options: Any) -> Client:
    """A client that fails fast instead of cycling through reconnect attempts.

    nats-py leaves the socket of a refused first connect open when reconnecting is off, so
    a failed connect is followed by `close()` here (else: ResourceWarning, an error here).
    """
    nc = Client()
    try:
        await nc.connect(servers=list(urls), allow_reconnect=False, connect_timeout=5, **options)
    except BaseException:
        await nc.close()
        raise
    return nc


async def poll_until(what: str, probe: Callable[[], Awaitable[T | None]]) -> T:
    """Await `probe` until it returns something, within POLL_DEADLINE (no fixed sleeps)."""
    last: BaseException | None = None
    with anyio.move_on_after(POLL_DEADLINE):
        while True:
            try:
                result = await probe()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                last = exc
            else:
                if result is not None:
                    return result
            await anyio.sleep(0.1)
    raise AssertionError(f"{what}: not within {POLL_DEADLINE}s (last error: {last!r})")


async def publish_one(server: NatsServer, payload: bytes) -> int:
    """Create the file-storage stream and publish one acknowledged message; its seq."""
    nc = await connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        ack = await js.publish(SUBJECT, payload)
        assert ack.stream == STREAM
        return ack.seq
    finally:
        await nc.close()


async def read_back(server: NatsServer, seq: int) -> bytes:
    nc = await connect(server.url)
    try:
        msg = await nc.jetstream().get_msg(STREAM, seq)
        return msg.data or b""
    finally:
        await nc.close()


# --- the binary and ports ----------------------------------------------------------------


def test_bundled_binary_is_found_and_runs() -> None:
    binary = nats_server_binary()
    assert os.access(binary, os.X_OK)
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=10
    )
    assert out.stdout.startswith("nats-server: v2.")


def test_free_port_is_free() -> None:
    assert not port_in_use("127.0.0.1", free_port())


# --- one server ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_acked_message_survives_restart(nats_server: NatsServer) -> None:
    seq = await publish_one(nats_server, b"first")
    old_pid = nats_server.pid

    nats_server.restart()

    assert nats_server.running
    assert nats_server.pid != old_pid
    assert await read_back(nats_server, seq) == b"first"


@pytest.mark.anyio
async def test_acked_message_survives_kill(nats_server: NatsServer) -> None:
    seq = await publish_one(nats_server, b"before the crash")

    nats_server.kill()
    assert not nats_server.running
    nats_server.restart()

    assert await read_back(nats_server, seq) == b"before the crash"


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    config = NatsServerConfig.in_dir(tmp_path, server_name="ctx")
    with NatsServer(config) as server:
        assert server.running
        assert server.url == f"nats://127.0.0.1:{config.port}"
        assert port_in_use(config.host, config.port)
        pid = server.pid
    assert not server.running
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not port_in_use(config.host, config.port)
    assert "Server is ready" in server.log_tail(100)


def test_second_server_cannot_take_a_used_port(
    nats_server: NatsServer, make_nats_server: MakeNatsServer
) -> None:
    taken = nats_server.config.port
    assert port_in_use("127.0.0.1", taken)

    with pytest.raises(NatsUnavailable, match="address already in use") as caught:
        make_nats_server(port=taken)

    assert "exited with code" in str(caught.value)
    assert nats_server.running  # the first server is untouched


def test_invalid_config_reports_the_parse_error(make_nats_server: MakeNatsServer) -> None:
    with pytest.raises(NatsUnavailable, match="exited with code 1") as caught:
        make_nats_server(extra_conf="authorization { users = [ { nkey: ")

    message = str(caught.value)
    assert ".conf" in message  # which file
    assert "last log lines" in message
    assert len(message.splitlines()) > 1  # the server's own complaint follows


def test_start_times_out_with_the_health_report(make_nats_server: MakeNatsServer) -> None:
    """A lone node whose routes lead nowhere never finds a JetStream meta leader."""
    lost = ClusterConfig(name="lost", port=free_port(), routes=(f"nats://127.0.0.1:{free_port()}",))

    with pytest.raises(NatsUnavailable, match=r"not ready after 1\.5s") as caught:
        make_nats_server(cluster=lost, timeout=1.5)

    assert "meta leader" in str(caught.value) or "meta layer" in str(caught.value)


# --- a cluster -----------------------------------------------------------------------------


def replicas_current(info: StreamInfo, size: int) -> bool:
    cluster = info.cluster
    if cluster is None or cluster.leader is None or cluster.replicas is None:
        return False
    peers = cluster.replicas
    return len(peers) == size - 1 and all(p.current and not p.offline for p in peers)


@pytest.mark.anyio
async def test_r3_stream_survives_losing_its_leader(nats_cluster: NatsCluster) -> None:
    nc = await connect(*nats_cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(
            name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE, num_replicas=3
        )

        async def publish_one_replicated() -> int:
            # A new R3 stream answers publishes once its leader is elected: until then
            # "no responders". The same Nats-Msg-Id on every try, so it lands once.
            ack = await js.publish(SUBJECT, b"one", headers={"Nats-Msg-Id": "one"}, timeout=2)
            return ack.seq

        assert await poll_until("first publish to the new stream", publish_one_replicated) == 1
        info = await js.stream_info(STREAM)
    finally:
        await nc.close()
    assert info.cluster is not None
    names = [server.name for server in nats_cluster.servers]
    leader = names.index(info.cluster.leader or "")

    nats_cluster.kill(leader)
    survivor = nats_cluster.servers[(leader + 1) % len(nats_cluster)]

    nc = await connect(survivor.url)
    try:
        js = nc.jetstream()

        async def publish_two() -> int:
            # The same Nats-Msg-Id on every try: a retry after a lost ack lands once.
            ack = await js.publish(SUBJECT, b"two", headers={"Nats-Msg-Id": "two"}, timeout=2)
            return ack.seq

        assert await poll_until("publish after losing the leader", publish_two) == 2
        new_info = await js.stream_info(STREAM)
        assert new_info.cluster is not None
        assert new_info.cluster.leader not in (None, names[leader])

        nats_cluster.restart(leader)

        async def all_current() -> StreamInfo | None:
            info = await js.stream_info(STREAM)
            return info if replicas_current(info, len(nats_cluster)) else None

        healed = await poll_until("all replicas current again", all_current)
        assert healed.state.messages == 2
    finally:
        await nc.close()

    nc = await connect(nats_cluster.servers[leader].url)
    try:
        # The rejoined node serves the message it missed while it was down.
        msg = await nc.jetstream().get_msg(STREAM, 2, direct=False)
        assert msg.data == b"two"
    finally:
        await nc.close()


# --- nkey authorization --------------------------------------------------------------------


def raw_nkey_connect(server: NatsServer, signer: nkeys.SigningKey | None) -> bytes:
    """CONNECT by hand (signing the INFO nonce), then PING; the server's answer line."""
    with socket.create_connection((server.config.host, server.config.port), timeout=5) as sock:
        stream = sock.makefile("rwb")
        info = json.loads(stream.readline().removeprefix(b"INFO "))
        options: dict[str, object] = {"verbose": False, "pedantic": False, "protocol": 1}
        if signer is not None:
            signature = signer.sign(info["nonce"].encode())
            options["nkey"] = signer.public_key
            options["sig"] = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        stream.write(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
        stream.flush()
        return stream.readline()


def test_nkey_seed_file_is_private(nkey_auth_server: NkeyAuthServer) -> None:
    seed_file = nkey_auth_server.seed_file
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    assert seed_file.read_text().startswith("SU")


@pytest.mark.anyio
async def test_nkey_server_refuses_a_client_without_the_seed(
    nkey_auth_server: NkeyAuthServer,
) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(nkey_auth_server.server.url)


def test_nkey_server_accepts_the_seed_and_no_other(
    nkey_auth_server: NkeyAuthServer, tmp_path: Path
) -> None:
    server, seed_file = nkey_auth_server
    user = nkeys.SigningKey.from_seed(seed_file.read_text().strip(), nkeys.Role.USER)
    stranger = nkeys.SigningKey.generate(nkeys.Role.USER)

    assert raw_nkey_connect(server, user) == b"PONG\r\n"
    assert raw_nkey_connect(server, stranger).startswith(b"-ERR 'Authorization Violation'")
    assert raw_nkey_connect(server, None).startswith(b"-ERR 'Authorization Violation'")


@pytest.mark.anyio
async def test_nats_py_connects_with_the_seed_file(nkey_auth_server: NkeyAuthServer) -> None:
    nc = await connect(nkey_auth_server.server.url, nkeys_seed=str(nkey_auth_server.seed_file))
    try:
        assert nc.is_connected
        await nc.flush()
    finally:
        await nc.close()
