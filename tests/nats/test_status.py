"""`secrets-nats-kv status` as a supervisor runs it: a real CLI process, real backends.

Exit 0 only when an instance of this backend answers, is caught up and has no incident;
1 otherwise, with the reason on stderr. Each instance gets one line with its version,
view position, public keys (never a seed) and incidents.
"""

from __future__ import annotations

import subprocess

import pytest

from secrets_nats_kv import __version__
from secrets_nats_kv.app.natsserver import NatsServer
from support.harness import Keys, cli_env, fresh_names, run_cli, running_backend


def status(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("status", *args, env=cli_env(None, NATS_ADDRESS=url.removeprefix("nats://")))


def assert_no_seed(result: subprocess.CompletedProcess[bytes], *keys: Keys) -> None:
    for key in keys:
        for seed in (key.transit.seed, key.encryption.seed):
            assert seed.encode() not in result.stdout + result.stderr


@pytest.mark.anyio
async def test_two_healthy_instances_give_0_and_a_line_each(nats_server: NatsServer) -> None:
    names = fresh_names()
    keys = Keys()
    async with (
        running_backend(nats_server.url, keys, names=names) as one,
        running_backend(nats_server.url, keys, names=names),
    ):
        await one.admin.put_secret("status-a", "value-for-status")
        result = await _run(nats_server.url, "-n", names.name, "-b", names.secrets_bucket)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert f"version {__version__}" in line
        assert f"transit {keys.transit.public_key}" in line
        assert f"encryption {keys.encryption.public_key}" in line
        assert line.endswith("\tok")
        assert "view at 1 of 1" in line
    assert_no_seed(result, keys)


@pytest.mark.anyio
async def test_an_incident_makes_it_unhealthy_and_is_shown(nats_server: NatsServer) -> None:
    names = fresh_names()
    async with running_backend(nats_server.url, names=names) as clients:
        clients.backend.health.report("bucket-ahead", "the secrets bucket is ahead of the log")
        clients.backend.health.report("bucket-ahead", "the secrets bucket is ahead of the log")
        result = await _run(nats_server.url, "-n", names.name)
    assert result.returncode == 1
    (line,) = result.stdout.decode().splitlines()
    assert "incident bucket-ahead: the secrets bucket is ahead of the log (2 times)" in line
    assert result.stderr.decode() == (
        "secrets-nats-kv: unhealthy: 1 instance of 1 behind or with an incident\n"
    )


@pytest.mark.anyio
async def test_no_instance_answering_is_1_in_one_line(nats_server: NatsServer) -> None:
    names = fresh_names()
    async with running_backend(nats_server.url, names=names):
        pass  # its log exists; no instance runs any more
    result = await _run(nats_server.url, "-n", names.name, "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"secrets-nats-kv: error: status: no instance of backend {names.name} answered "
        "within 0.5s\n"
    )


def test_a_backend_that_never_ran_here_is_named(nats_server: NatsServer) -> None:
    result = status(nats_server.url, "-n", "nobody")
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.count("\n") == 1
    assert "SECRETS_nobody_events" in stderr
    assert "-n nobody" in stderr


def test_instances_of_other_backends_are_not_counted(nats_server: NatsServer) -> None:
    import anyio

    async def scenario() -> subprocess.CompletedProcess[bytes]:
        mine, other = fresh_names(), fresh_names()
        async with running_backend(nats_server.url, names=mine):
            pass
        async with running_backend(nats_server.url, names=other):
            return await _run(nats_server.url, "-n", mine.name, "--timeout", "0.5")

    result = anyio.run(scenario)
    assert result.returncode == 1
    assert b"no instance of backend" in result.stderr


async def _run(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    import anyio

    return await anyio.to_thread.run_sync(lambda: status(url, *args))
