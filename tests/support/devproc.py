"""`secrets-nats-kv dev` as a subprocess, for the tests that run it (test_dev, test_dev_cleanup).

A started `dev` prints a banner of `export` lines and runs until interrupted; its
stdout is read by a thread so the pipe can never fill up, and every `dev` a test starts
is killed at the end if it is still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.harness import CLI, REPO, cli_env

BANNER_END = "# NATS with JetStream at "


@dataclass
class DevProcess:
    """A running `dev` command; stdout is read by a thread so it can never fill up."""

    proc: subprocess.Popen[bytes]
    stderr: Path
    lines: list[str] = field(default_factory=list)
    banner: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if line.startswith(BANNER_END):
                    self.banner.set()
        self.banner.set()  # EOF: the process ended; exports() reports what it said

    def exports(self, deadline: float = 30.0) -> dict[str, str]:
        """The `export NAME=VALUE` lines, once the banner is complete."""
        assert self.banner.wait(deadline), "dev printed no banner in time"
        assert any(line.startswith(BANNER_END) for line in self.lines), (
            f"dev ended early: {self.lines} {self.stderr.read_text()}"
        )
        exported = {}
        for line in self.lines:
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                exported[name] = value
        return exported

    def interrupt(self, deadline: float = 10.0) -> tuple[int, float]:
        """Ctrl-C: the exit code and how long it took."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(deadline)
        return code, time.monotonic() - began


@dataclass
class Devs:
    """The `dev` processes one test starts, their stderr kept in `directory`."""

    directory: Path
    started: list[DevProcess] = field(default_factory=list)

    def start(self, data_dir: Path, address: str, **env: str) -> DevProcess:
        """`dev --data-dir DATA_DIR --nats-address ADDRESS`, with `env` set for it."""
        stderr = self.directory / f"dev-{len(self.started)}.err"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [*CLI, "dev", "--data-dir", str(data_dir), "--nats-address", address],
                env=cli_env(None, **env),
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
            )
        dev = DevProcess(proc, stderr)
        self.started.append(dev)
        return dev

    def kill_all(self) -> None:
        """Every `dev` still running, killed (a test that ends early leaves none behind)."""
        for dev in self.started:
            if dev.proc.poll() is None:
                dev.proc.kill()
                dev.proc.wait(15)


def spawn_dev(data_dir: Path, address: str, log: Path) -> subprocess.Popen[bytes]:
    """`dev` with its stderr (where it logs) in `log` and its banner thrown away: for the
    tests that only watch the log and signal the process (test_signals)."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [*CLI, "dev", "--data-dir", str(data_dir), "--nats-address", address],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
