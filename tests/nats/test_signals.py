"""SIGTERM and SIGINT end every command promptly, in one line, with the documented code.

Each case is a real CLI process in the state named (connecting to a NATS that never
answers, serving, reconnecting after its NATS died, waiting for a reply that never
comes). The test waits for the process to reach that state (a log line, an accepted
connection, a request arriving), signals it, and checks the exit code and that stderr
holds no traceback. Codes (README "Exit codes"): 0 for `run`/`dev` after a clean drain,
128 + the signal's number otherwise (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from secrets_nats_kv.app.dev import PID_FILE
from secrets_nats_kv.app.natsserver import NatsServer, free_port
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from support.devproc import spawn_dev
from support.harness import CLI, REPO, Keys, cli_env, spawn_run

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])


def wait_for_line(
    log: Path, text: str, proc: subprocess.Popen[bytes], deadline: float = 30.0
) -> None:
    """Until `text` shows in `log` (the process reached a state); fails if it exits first."""
    end = time.monotonic() + deadline
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()}"
        assert time.monotonic() < end, f"{text!r} never logged: {log.read_text()}"
        time.sleep(0.05)  # polling a log file for an event the process reports


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, log: Path) -> tuple[int, str]:
    proc.send_signal(sig)
    code = proc.wait(30)  # promptly: well inside the drain deadline of 15 s
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    return code, text


def serving_run(
    url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], Path]:
    """`run` started on `url` and serving (it logged "backend ready"), and its log."""
    log = tmp_path / "run.log"
    proc = spawn_run(url, cli_env(Keys()), log=log)
    processes.append(proc)
    wait_for_line(log, "backend ready", proc)
    return proc, log


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections and never says a word (a NATS that hangs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


# --- run ---------------------------------------------------------------------------------


@SIGNALS
def test_run_while_connecting_to_an_unreachable_nats_stops_with_0(
    sig: signal.Signals, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{held.getsockname()[1]}"
        log = tmp_path / "run.log"
        proc = spawn_run(url, cli_env(Keys()), log=log)
        processes.append(proc)
        wait_for_line(log, "NATS connection error", proc)
        code, text = stop(proc, sig, log)
    assert code == 0, text  # it never took a request: nothing was left undrained
    assert "stopping" in text


@SIGNALS
def test_run_serving_stops_with_0_after_a_clean_drain(
    sig: signal.Signals,
    nats_server: NatsServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    proc, log = serving_run(nats_server.url, tmp_path, processes)
    code, text = stop(proc, sig, log)
    assert code == 0, text


@SIGNALS
def test_run_whose_nats_died_stops_with_the_signal_code_in_one_line(
    sig: signal.Signals,
    nats_server: NatsServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    proc, log = serving_run(nats_server.url, tmp_path, processes)
    nats_server.kill()
    wait_for_line(log, "reconnecting", proc)
    code, text = stop(proc, sig, log)
    assert code == CODES[sig], text
    last = text.splitlines()[-1]
    assert last.startswith(f"secrets-nats-kv: stopped by {sig.name}"), last
    assert "NATS was unreachable" in last


def test_dev_stops_with_0_on_sigterm(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "dev.log"
    proc = spawn_dev(tmp_path / "data", f"127.0.0.1:{free_port()}", log)
    processes.append(proc)
    wait_for_line(log, "backend ready", proc)
    code, text = stop(proc, signal.SIGTERM, log)
    assert code == 0, text


# --- client commands -----------------------------------------------------------------------


def spawn_client(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=out, cwd=REPO
        )


def one_line(text: str, sig: signal.Signals) -> None:
    assert text == f"secrets-nats-kv: interrupted by {sig.name}\n", text


@SIGNALS
@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["get", "x"],
        ["put", "x", "--string", "irrelevant"],
        ["backup", "--output", "OUT"],
        ["status"],
    ],
    ids=["list", "get", "put", "backup", "status"],
)
def test_client_command_while_connecting(
    sig: signal.Signals,
    command: list[str],
    silent_listener: socket.socket,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    address = f"127.0.0.1:{silent_listener.getsockname()[1]}"
    command = [str(tmp_path / "out") if word == "OUT" else word for word in command]
    log = tmp_path / "client.log"
    proc = spawn_client(command, cli_env(Keys(), NATS_ADDRESS=address), log)
    processes.append(proc)
    silent_listener.settimeout(30)
    connection, _ = silent_listener.accept()  # it is connecting now, and will wait for INFO
    with connection:
        code, text = stop(proc, sig, log)
    assert code == CODES[sig]
    one_line(text, sig)


async def _hold_requests(
    url: str, arrived: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """A fake backend: takes every request on the default subject and never replies."""
    nc = await connect(NatsOptions(servers=(url,)), name="black hole", persistent=False)
    try:

        async def swallow(msg: object) -> None:
            arrived.set()

        await nc.subscribe(f"{BackendNames().subject_prefix}.>", cb=swallow)
        await nc.flush()
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):  # cancelled is how it ends: close anyway
            await nc.close()


@SIGNALS
def test_client_command_waiting_for_a_reply(
    sig: signal.Signals,
    nats_server: NatsServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    log = tmp_path / "client.log"
    env = cli_env(Keys(), NATS_ADDRESS=nats_server.url.removeprefix("nats://"))
    codes: list[tuple[int, str]] = []

    async def scenario() -> None:
        arrived = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(_hold_requests, nats_server.url, arrived)
            proc = spawn_client(["list"], env, log)
            processes.append(proc)
            with anyio.fail_after(30):
                await arrived.wait()  # the request is in flight, its reply will never come
            codes.append(await anyio.to_thread.run_sync(stop, proc, sig, log))
            tg.cancel_scope.cancel()

    anyio.run(scenario)
    ((code, text),) = codes
    assert code == CODES[sig]
    one_line(text, sig)


@SIGNALS
def test_dev_whose_nats_died_stops_in_one_line_without_a_traceback(
    sig: signal.Signals, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`dev`'s own nats-server killed under it: `dev` ends in one line, never a traceback,
    whether it notices first (its server is gone) or the signal does."""

    log = tmp_path / "dev.log"
    data = tmp_path / "data"
    proc = spawn_dev(data, f"127.0.0.1:{free_port()}", log)
    processes.append(proc)
    wait_for_line(log, "backend ready", proc)
    server_pid = int((data / "nats" / PID_FILE).read_text().strip())
    os.kill(server_pid, signal.SIGKILL)
    end = time.monotonic() + 30
    while proc.poll() is None and "reconnecting" not in log.read_text(errors="replace"):
        assert time.monotonic() < end, log.read_text()
        time.sleep(0.05)  # polling the log for the event the process reports
    if proc.poll() is None:
        code, text = stop(proc, sig, log)
        assert code == CODES[sig], text
        assert f"stopped by {sig.name} while NATS was unreachable" in text.splitlines()[-1]
    else:
        code, text = proc.returncode, log.read_text(errors="replace")
        assert code != 0, text
        assert "Traceback" not in text, text
    last = text.splitlines()[-1]
    assert last.startswith("secrets-nats-kv: "), last
