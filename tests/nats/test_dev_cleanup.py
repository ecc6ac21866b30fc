"""`dev` cleans up after itself: no nats-server outlives it, seeds in the environment win,
and `dev rotate-key` rotates its store in one command.

Every process here is real: `dev` as a subprocess, its bundled nats-server, and the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secrets_nats_kv.app import dev
from secrets_nats_kv.app.natsserver import NatsServer, free_port
from secrets_nats_kv.xkeys import XKey
from support.devproc import DevProcess, Devs, alive
from support.harness import Identity, cli_env, run_cli
from support.leakcheck import remembered


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., DevProcess]]:
    devs = Devs(tmp_path)
    yield devs.start
    devs.kill_all()


def server_pid(data: Path) -> int:
    return int((data / "nats" / dev.PID_FILE).read_text().strip())


def wait_gone(pid: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while alive(pid):
        assert time.monotonic() < end, f"nats-server {pid} outlived dev"
        time.sleep(0.05)  # polling another process's exit: no event to wait on


def put_and_get(exports: dict[str, str], name: str) -> str:
    value = remembered(f"dev-{os.urandom(8).hex()}", "secret value")
    env = cli_env(None, **exports)
    put = run_cli("put", name, "--string", value, env=env)
    assert put.returncode == 0, put.stderr
    got = run_cli("get", name, env=env)
    assert got.stdout == value.encode() + b"\n", got.stderr
    return value


def test_kill_9_of_dev_takes_its_nats_server_with_it_and_dev_starts_again(
    tmp_path: Path, start: object
) -> None:
    data, address = tmp_path / "data", f"127.0.0.1:{free_port()}"
    first = start(data, address)
    exports = first.exports()
    value = put_and_get(exports, "kept")
    pid = server_pid(data)
    assert alive(pid)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    wait_gone(pid)

    second = start(data, address)
    assert second.exports() == exports
    got = run_cli("get", "kept", env=cli_env(None, **exports))
    assert got.stdout == value.encode() + b"\n"


def test_a_later_dev_stops_the_orphan_its_pid_file_names_and_nothing_else(
    tmp_path: Path, start: object
) -> None:
    """A server left by a dev that could not stop it (no parent-death signal: not Linux)."""
    data, host, port = tmp_path / "data", "127.0.0.1", free_port()
    dev.prepare_folder(str(data))
    orphan = NatsServer(dev.server_config(data.resolve(), host, port)).start()
    try:
        orphan_pid = orphan.pid
        assert orphan_pid is not None
        assert server_pid(data) == orphan_pid
        fresh = start(data, f"{host}:{port}")
        fresh.exports()
        assert f"stopped nats-server {orphan_pid}" in fresh.stderr.read_text()
        assert not orphan.running
    finally:
        orphan.stop()


def test_a_stale_pid_file_naming_another_process_is_left_alone(
    tmp_path: Path, start: object
) -> None:
    data, address = tmp_path / "data", f"127.0.0.1:{free_port()}"
    (data / "nats").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (data / "nats" / dev.PID_FILE).write_text(f"{bystander.pid}\n")
        started = start(data, address)
        started.exports()
        assert bystander.poll() is None, "dev stopped a process that was not its nats-server"
        assert "stopped nats-server" not in started.stderr.read_text()
    finally:
        bystander.kill()
        bystander.wait()


def test_seeds_in_the_environment_win_over_the_stored_ones(tmp_path: Path, start: object) -> None:
    data, address = tmp_path / "data", f"127.0.0.1:{free_port()}"
    first = start(data, address)
    stored = first.exports()
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(15) == 0

    chosen = {
        "TRANSIT_XKEY_SEED": remembered(XKey.generate().seed, "seed"),
        "ENCRYPTION_XKEY_SEED": remembered(XKey.generate().seed, "seed"),
    }
    other = tmp_path / "other"
    second = start(other, address, **chosen)
    exports = second.exports()
    assert {k: exports[k] for k in chosen} == chosen
    put_and_get(exports, "from-env")
    assert not (other / "encryption.seed").exists()  # neither read nor written
    assert (data / "encryption.seed").read_text().strip() == stored["ENCRYPTION_XKEY_SEED"]


def test_dev_rotate_key_rotates_the_store_in_one_command(tmp_path: Path, start: object) -> None:
    data, address = tmp_path / "data", f"127.0.0.1:{free_port()}"
    first = start(data, address)
    old = first.exports()
    value = put_and_get(old, "rotated")
    who = Identity()
    env = cli_env(None, **old)
    assert run_cli("add-mapping", who.entity_key, "--secret", "rotated", env=env).returncode == 0
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(15) == 0

    rotated = run_cli(
        "dev", "rotate-key", "--data-dir", str(data), "--nats-address", address, env=cli_env()
    )
    assert rotated.returncode == 0, rotated.stderr
    lines = rotated.stdout.decode().splitlines()
    (export,) = [line for line in lines if line.startswith("export ENCRYPTION_XKEY_SEED=")]
    new_seed = export.partition("=")[2]
    assert new_seed != old["ENCRYPTION_XKEY_SEED"]
    assert (data / "encryption.seed").read_text().strip() == new_seed
    assert (data / "encryption.seed.previous").read_text().strip() == old["ENCRYPTION_XKEY_SEED"]
    assert not (data / "encryption.seed.next").exists()

    second = start(data, address)
    new = second.exports()
    assert new["ENCRYPTION_XKEY_SEED"] == new_seed
    got = run_cli("get", "rotated", env=cli_env(None, **new))
    assert got.stdout == value.encode() + b"\n", got.stderr
    shown = run_cli("mappings", who.entity_key, env=cli_env(None, **new))
    assert shown.stdout.decode() == f"{who.entity_key}\trotated\n"
    stale = run_cli("get", "rotated", env=cli_env(None, **old))
    assert b"rotated to a new key" in stale.stderr


def test_dev_rotate_key_refuses_while_dev_runs(tmp_path: Path, start: object) -> None:
    data, address = tmp_path / "data", f"127.0.0.1:{free_port()}"
    running = start(data, address)
    running.exports()
    refused = run_cli(
        "dev", "rotate-key", "--data-dir", str(data), "--nats-address", address, env=cli_env()
    )
    assert refused.returncode == 1
    assert "stop `dev` first" in refused.stderr.decode()
    assert running.proc.poll() is None
