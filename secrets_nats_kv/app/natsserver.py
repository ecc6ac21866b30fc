"""Run the bundled `nats-server`: one node, configured for JetStream (clusters: tests/support).

Used by the product's `dev` command and by every test that needs NATS, so both run the
same binary the same way: a rendered config file (not a pile of flags), output captured
in a log file, readiness decided by events the server itself reports (its `/healthz`
endpoint and the INFO line on its client port), never by sleeping. What it is started
with (the binary, ports, the config file) is `natsserver_config`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from secrets_nats_kv.app.natsserver_config import (
    ClusterConfig,
    NatsServerConfig,
    free_port,
    free_ports,
    hostport,
    nats_server_binary,
    port_in_use,
)
from secrets_nats_kv.errors import NatsUnavailable

# The config's names are importable from here too: a caller starting a server needs both.
__all__ = [
    "ClusterConfig",
    "NatsServer",
    "NatsServerConfig",
    "free_port",
    "free_ports",
    "hostport",
    "nats_server_binary",
    "port_in_use",
]

LOG_TAIL_LINES = 25
_POLL_FIRST, _POLL_MAX = 0.02, 0.25
# The server logs a warning for every failed /healthz; our own polling is no news, and
# the health report is already in the error message, so the log tail leaves them out.
_PROBE_NOISE = "Healthcheck failed:"
_PROBE_TIMEOUT = 1.0


# --- one server ---------------------------------------------------------------------------

# Every process this module started and has not yet reaped, killed at interpreter exit so
# that a crashed test run or an interrupted `dev` does not leave servers behind.
_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _children_lock:
        leftovers = list(_children)
        _children.clear()
    for proc in leftovers:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook: the server gets SIGTERM when the thread that started it
    dies, however it dies (SIGKILL included), so `dev` cannot leave it behind. Elsewhere
    None (`dev` then relies on the server's pid file).

    The kernel ties this to the starting *thread*: start such a server from a thread that
    lives as long as its owner (the main thread), never from a worker thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


def _read_tail(path: Path, offset: int, lines: int) -> str:
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            start = max(offset, size - 64 * 1024)
            log.seek(start)
            data = log.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc.strerror})"
    kept = [
        line
        for line in data.decode("utf-8", errors="replace").splitlines()
        if line.strip() and _PROBE_NOISE not in line
    ]
    return "\n".join(kept[-lines:]) if kept else "(log is empty)"


class NatsServer:
    """One nats-server process; `restart()` reuses its config, data dir and ports."""

    def __init__(
        self,
        config: NatsServerConfig,
        *,
        conf_dir: Path | None = None,
        binary: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.config = config
        self._die_with_parent = die_with_parent
        self._conf_dir = conf_dir if conf_dir is not None else config.log_file.parent
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<NatsServer {self.config.server_name} {self.url} {state}>"

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def name(self) -> str:
        return self.config.server_name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def conf_file(self) -> Path:
        return self._conf_dir / f"{self.config.server_name}.conf"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the current (or last) run wrote; earlier runs are left out."""
        return _read_tail(self.config.log_file, self._log_offset, lines)

    # -- lifecycle

    def launch(self) -> None:
        """Spawn the process without waiting; `wait_ready` completes a start.

        Split from `start` because a cluster node cannot become ready (elect a JetStream
        meta leader) until its peers run too.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._reap()
        binary = self._binary if self._binary is not None else nats_server_binary()
        conf = self.config.write(self._conf_dir)
        self.config.store_dir.mkdir(parents=True, exist_ok=True)
        self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.config.log_file.open("ab") as log:
            self._log_offset = log.tell()
            proc = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._conf_dir,
                # Its own session: a Ctrl-C meant for the test run or `dev` reaches us, and
                # we stop the server in order instead of it dying mid-write.
                start_new_session=True,
                preexec_fn=_parent_death_signal() if self._die_with_parent else None,
            )
        with _children_lock:
            _children.add(proc)
        self._proc = proc

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the server is ready, or raise `NatsUnavailable` with its log tail.

        Ready means: the process is alive, `/healthz` answers 200 `{"status":"ok"}` (which
        covers JetStream: in a cluster it answers 503 "still recovering meta layer", then
        503 "has not established contact with a meta leader", until a meta leader is
        elected; a restarted node's streams may still lag behind their leader when it turns
        ok), and the client port answers with an INFO naming this
        server (the monitor listener starts before the client one, and a port taken by
        someone else must not pass as ours).  Hence `extra_conf` must keep plain-text INFO
        (no `handshake_first` TLS) and must not replace the `http` monitor listener.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self!r} was never launched")
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        pause = _POLL_FIRST
        while True:
            code = proc.poll()
            if code is not None:
                self._forget(proc)
                raise NatsUnavailable(
                    f"nats-server {self.name} exited with code {code} before it was ready "
                    f"(config {self.conf_file}); last log lines:\n{self.log_tail()}"
                )
            health = self._healthz()
            if health is None:
                identity = self._client_port_identity()
                if identity == self.name:
                    return
                last = f"client port {self.config.port}: {identity}"
            else:
                last = health
            if time.monotonic() >= deadline:
                raise NatsUnavailable(
                    f"nats-server {self.name} not ready after {timeout:g}s ({last}); "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, _POLL_MAX)

    def start(self, timeout: float = 20.0) -> Self:
        """Launch and wait until ready; a server that fails to get ready is stopped."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (JetStream flushes and leaves cleanly), SIGKILL if that takes too long."""
        self._signal(signal.SIGTERM)
        self._wait_stopped(timeout)

    def kill(self) -> None:
        """SIGKILL, for fault injection: no shutdown, no flush, like a crash."""
        self._signal(signal.SIGKILL)
        self._wait_stopped(10.0)

    def restart(self, timeout: float = 20.0) -> Self:
        """Stop if running, then start again with the same config, data and ports."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _wait_stopped(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._forget(proc)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._forget(self._proc)

    @staticmethod
    def _forget(proc: subprocess.Popen[bytes]) -> None:
        with _children_lock:
            _children.discard(proc)

    def _healthz(self) -> str | None:
        """None when healthy, else a short description of what `/healthz` said."""
        url = f"{self.config.monitor_url}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT) as reply:
                status, body = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
            err.close()
        except (OSError, ValueError) as err:
            return f"/healthz unreachable: {err}"
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if status == 200 and isinstance(parsed, dict) and parsed.get("status") == "ok":
            return None
        return f"/healthz {status}: {body.decode('utf-8', errors='replace').strip()[:300]}"

    def _client_port_identity(self) -> str:
        """The server_name in the INFO line on the client port, or why there is none."""
        try:
            with socket.create_connection(
                (self.config.host, self.config.port), timeout=_PROBE_TIMEOUT
            ) as sock:
                line = sock.makefile("rb").readline(64 * 1024)
        except OSError as err:
            return f"unreachable: {err}"
        if not line.startswith(b"INFO "):
            return f"no INFO line: {line[:80]!r}"
        try:
            info = json.loads(line[5:])
        except ValueError:
            return "malformed INFO line"
        name = info.get("server_name") if isinstance(info, dict) else None
        return name if isinstance(name, str) else "INFO without server_name"
