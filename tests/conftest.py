"""Shared test harness: real nats-server processes on free loopback ports, one per test.

Every fixture here starts its own server(s) in the test's `tmp_path` and stops them at
teardown, whether the test passed or not; no test depends on a server someone else ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import nacl.signing
import pytest
from hypothesis import settings

from secrets_nats_kv import nkeys
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from support.cluster import NatsCluster

# The end-of-suite no-leak scan: every plaintext, seed and JWT the harness hands out is
# searched for in every file the tests' servers wrote (tests/leakcheck.py).
pytest_plugins = ["support.leakcheck"]

MakeNatsServer = Callable[..., NatsServer]

# Hypothesis runs 100 examples of a property by default. Here a property that states no
# count of its own runs 50, so the unit tier (some seventy properties) stays a loop of
# seconds; the ones that need more say so where they are (the model: 2,000 histories,
# the chain's foreign runs: 100 logs, ...). SECRETS_NATS_KV_LONG_TESTS=1 runs 1,000.
settings.register_profile("suite", max_examples=50)
settings.register_profile("long", max_examples=1000)
settings.load_profile("long" if os.environ.get("SECRETS_NATS_KV_LONG_TESTS") == "1" else "suite")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt what collection built (modules, strategies, the test items) from the garbage
    collector: it lives to the end of the run, and walking it again in every full
    collection cost the unit tier about a second."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio only (nats-py is asyncio-only)."""
    return "asyncio"


@pytest.fixture
def make_nats_server(tmp_path: Path) -> Iterator[MakeNatsServer]:
    """Factory `make_nats_server(start=True, timeout=20.0, **config_overrides)`; stops all."""
    with contextlib.ExitStack() as stops:  # runs every stop even if one of them fails
        count = 0

        def make(*, start: bool = True, timeout: float = 20.0, **overrides: Any) -> NatsServer:
            nonlocal count
            name = f"test-{count}"
            count += 1
            config = NatsServerConfig.in_dir(tmp_path / name, server_name=name)
            server = NatsServer(dataclasses.replace(config, **overrides))
            stops.callback(server.stop)
            if start:
                server.start(timeout)
            return server

        yield make


@pytest.fixture
def nats_server(make_nats_server: MakeNatsServer) -> NatsServer:
    """A fresh single-node JetStream server (file storage in tmp_path), started."""
    return make_nats_server()


@pytest.fixture(scope="module")
def module_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One server for a whole module (a server per test would dominate its run time).

    Tests sharing it isolate themselves with `harness.fresh_names()`: their own backend
    name and secrets bucket, so no test sees another's streams, subjects or revisions.
    """
    directory = tmp_path_factory.mktemp("module-server")
    server = NatsServer(NatsServerConfig.in_dir(directory, server_name="module"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`run` processes a test starts: killed at teardown if still running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node routed JetStream cluster, started with its meta leader elected."""
    cluster = NatsCluster(tmp_path / "cluster", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class NkeyAuthServer(NamedTuple):
    server: NatsServer
    seed_file: Path


def write_nkey_user(directory: Path) -> tuple[str, Path]:
    """A fresh user nkey: its public key (U…) and a 0600 file holding its seed (SU…)."""
    signing_key = nacl.signing.SigningKey.generate()
    public_key = nkeys.encode_public(nkeys.Role.USER, bytes(signing_key.verify_key))
    seed = nkeys.encode_seed(nkeys.Role.USER, bytes(signing_key))
    directory.mkdir(parents=True, exist_ok=True)
    seed_file = directory / f"{public_key[:8]}.nk"
    fd = os.open(seed_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(seed + "\n")
    return public_key, seed_file


@pytest.fixture
def nkey_auth_server(make_nats_server: MakeNatsServer, tmp_path: Path) -> NkeyAuthServer:
    """A JetStream server admitting only one nkey user; yields (server, seed_file)."""
    public_key, seed_file = write_nkey_user(tmp_path / "nkeys")
    extra = f'authorization {{\n  users = [ {{ nkey: "{public_key}" }} ]\n}}'
    return NkeyAuthServer(make_nats_server(extra_conf=extra), seed_file)
