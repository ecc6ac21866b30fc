"""A real `secrets-nats-kv run` process for CLI tests, and checks on what a CLI run printed."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import BackendNames
from support.harness import Keys, cli_env, spawn_run, wait_until_answering

PREFIX = "secrets-nats-kv: error:"


@dataclass
class CliBackend:
    server: NatsServer
    keys: Keys
    env: dict[str, str]
    directory: Path

    @property
    def address(self) -> str:
        return self.server.url.removeprefix("nats://")


@contextlib.contextmanager
def cli_backend(
    directory: Path, *run_args: str, names: BackendNames | None = None
) -> Iterator[CliBackend]:
    """A server and a `run` process on it (with `run_args`), answering before this yields."""
    server = NatsServer(NatsServerConfig.in_dir(directory / "nats", server_name="cli")).start()
    try:
        keys = Keys()
        env = cli_env(keys, NATS_ADDRESS=server.url.removeprefix("nats://"))
        proc = spawn_run(server.url, env, *run_args, log=directory / "run.log")
        try:
            anyio.run(wait_until_answering, server.url, names)
            yield CliBackend(server, keys, env, directory)
        finally:
            proc.terminate()
            proc.wait(15)
    finally:
        server.stop()


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    """The stdout of a successful run (as text), after checking it succeeded quietly."""
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stderr == b"", result.stderr
    return result.stdout.decode()


def one_line_error(result: subprocess.CompletedProcess[bytes], *words: str) -> str:
    """The single error line of a failed run; it must name each of `words`."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0, stderr
    assert result.stdout == b"", "a failure printed on stdout"
    assert "Traceback" not in stderr
    assert stderr.endswith("\n")
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    (line,) = lines
    assert line.startswith(PREFIX + " "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line
