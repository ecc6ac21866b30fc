"""`secrets-nats-kv dev` as a developer uses it: one command, a working backend, Ctrl-C.

The process under test is the real CLI; it starts its own nats-server. The test reads
its `export` lines as a developer would paste them, uses them with the CLI and with a
host client, interrupts it, and checks that nothing is left running and that a restart
on the same folder brings back the same keys and the same data.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_nats_kv.app.natsserver import free_port, port_in_use
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import XKey
from support.devproc import Devs, alive
from support.harness import Identity, cli_env, run_cli, wait_until_answering
from support.host import HostClient

EXPORTS = ("TRANSIT_XKEY_SEED", "ENCRYPTION_XKEY_SEED", "NATS_ADDRESS")


def nats_server_pid(data_dir: Path) -> int:
    """The pid of the latest nats-server run in `data_dir`, from its own log's prefix."""
    log = (data_dir / "nats" / "nats-server.log").read_text()
    starts = re.findall(r"^\[(\d+)\] .*Starting nats-server", log, flags=re.M)
    assert starts, log[-2000:]
    return int(starts[-1])


@pytest.fixture
def devs(tmp_path: Path) -> Iterator[Devs]:
    devs = Devs(tmp_path)
    servers: list[int] = []
    try:
        yield devs
    finally:
        devs.kill_all()
        for data_dir in tmp_path.glob("*/nats/nats-server.log"):
            servers.append(nats_server_pid(data_dir.parent.parent))
        for pid in servers:  # a nats-server `dev` failed to stop (the test has failed)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def host_get(url: str, who: Identity, key: str) -> str | None:
    nc = await connect(NatsOptions(servers=(url,)), name="dev test", persistent=False)
    try:
        host = HostClient(nc, BackendNames())
        secret = await host.get(key, entity_jwt=who.entity_jwt(), host_jwt=who.host_jwt())
    finally:
        await nc.close()
    return secret.string_secret


def no_seed_in(data: bytes, exports: dict[str, str]) -> None:
    for name in ("TRANSIT_XKEY_SEED", "ENCRYPTION_XKEY_SEED"):
        assert exports[name].encode() not in data, f"{name} leaked"


@pytest.mark.anyio
async def test_dev_serves_stops_cleanly_and_restarts_with_the_same_keys_and_data(
    tmp_path: Path, devs: Devs
) -> None:
    data = tmp_path / "dev-data"
    address = f"127.0.0.1:{free_port()}"
    url = f"nats://{address}"
    first = devs.start(data, address)
    exports = first.exports()
    assert sorted(exports) == sorted(EXPORTS)
    assert exports["NATS_ADDRESS"] == address
    transit = XKey.from_seed(exports["TRANSIT_XKEY_SEED"])
    XKey.from_seed(exports["ENCRYPTION_XKEY_SEED"])
    await wait_until_answering(url)

    assert data.stat().st_mode & 0o777 == 0o700
    for file_name, variable in (
        ("transit.seed", "TRANSIT_XKEY_SEED"),
        ("encryption.seed", "ENCRYPTION_XKEY_SEED"),
    ):
        seed_file = data / file_name
        assert seed_file.stat().st_mode & 0o777 == 0o600
        assert seed_file.read_text().strip() == exports[variable]

    # What the README's "Trying it" does, with the pasted exports.
    env = cli_env(None, **exports)
    value = f"dev-value-{os.urandom(8).hex()}"
    put = run_cli("put", "secret-foo", env={**env, "SECRET_STRING_VALUE": value})
    assert put.returncode == 0, put.stderr
    who = Identity()
    mapped = run_cli("add-mapping", who.entity_key, "--secret", "secret-foo", env=env)
    assert mapped.returncode == 0, mapped.stderr
    assert await host_get(url, who, "secret-foo") == value
    assert run_cli("get", "secret-foo", env=env).stdout == value.encode() + b"\n"
    # The server answers with the transit key the export line gave.
    nc = await connect(NatsOptions(servers=(url,)), name="dev test", persistent=False)
    try:
        assert await HostClient(nc, BackendNames()).server_xkey() == transit.public_key
    finally:
        await nc.close()

    server_pid = nats_server_pid(data)
    assert alive(server_pid)
    code, took = first.interrupt()
    assert code == 0, first.stderr.read_text()
    assert took < 10
    assert not alive(server_pid), "dev exited but left its nats-server running"
    assert not port_in_use("127.0.0.1", int(address.rsplit(":", 1)[1]))
    no_seed_in(first.stderr.read_bytes(), exports)

    second = devs.start(data, address)
    assert second.exports() == exports  # same seeds, from the files
    await wait_until_answering(url)
    assert await host_get(url, who, "secret-foo") == value
    assert run_cli("get", "secret-foo", env=env).stdout == value.encode() + b"\n"

    # A second `dev` on the same port: one clear line, nothing printed, nothing created.
    other = tmp_path / "other-data"
    clash = run_cli("dev", "--data-dir", str(other), "--nats-address", address, env=cli_env())
    assert clash.returncode != 0
    assert clash.stdout == b""
    lines = clash.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("secrets-nats-kv: error: ")
    assert f"{address} is already in use" in lines[0]
    assert not other.exists()

    code, _ = second.interrupt()
    assert code == 0, second.stderr.read_text()
    no_seed_in(second.stderr.read_bytes(), exports)
