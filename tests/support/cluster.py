"""N routed JetStream nodes on loopback, for the tests' fault injection and the benches.

Test-only: the product runs one bundled node (`dev`); clusters are the operator's.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from secrets_nats_kv.app.natsserver import (
    ClusterConfig,
    NatsServer,
    NatsServerConfig,
    free_ports,
    hostport,
)
from secrets_nats_kv.errors import ConfigError


@dataclass(eq=False)
class NatsCluster:
    """N routed JetStream nodes on loopback, each with its own store, log and ports."""

    directory: Path
    size: int = 3
    name: str = "secrets-nats-kv"
    host: str = "127.0.0.1"
    extra_conf: str = ""
    binary: Path | None = None
    servers: list[NatsServer] = field(init=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"a cluster needs at least one node, not {self.size}")
        ports = free_ports(3 * self.size, self.host)
        client, monitor, route = (ports[i::3] for i in range(3))
        self.servers = []
        for i in range(self.size):
            node_dir = self.directory / f"n{i}"
            routes = tuple(
                f"nats-route://{hostport(self.host, route[j])}" for j in range(self.size) if j != i
            )
            config = NatsServerConfig(
                port=client[i],
                monitor_port=monitor[i],
                store_dir=node_dir / "store",
                server_name=f"{self.name}-n{i}",
                log_file=node_dir / "nats-server.log",
                host=self.host,
                cluster=ClusterConfig(name=self.name, port=route[i], routes=routes),
                extra_conf=self.extra_conf,
            )
            self.servers.append(NatsServer(config, binary=self.binary))

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All client URLs comma-joined, the form `--nats-url` style flags take."""
        return ",".join(self.urls)

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, index: int) -> NatsServer:
        return self.servers[index]

    def start(self, timeout: float = 30.0) -> Self:
        """Launch every node, then wait until each reports healthy (meta leader elected)."""
        try:
            for server in self.servers:
                server.launch()
            self._wait_ready(self.servers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Signal every node at once, then wait for each: a cluster shuts down in parallel."""
        for server in self.servers:
            server._signal(signal.SIGTERM)
        for server in self.servers:
            server._wait_stopped(timeout)

    def kill(self, index: int) -> None:
        self.servers[index].kill()

    def restart(self, index: int, timeout: float = 30.0) -> NatsServer:
        """Restart one node; returns once it is healthy again (rejoined, assets current)."""
        return self.servers[index].restart(timeout)

    def running(self) -> list[NatsServer]:
        return [server for server in self.servers if server.running]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _wait_ready(servers: Sequence[NatsServer], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for server in servers:
            server.wait_ready(max(0.0, deadline - time.monotonic()))
