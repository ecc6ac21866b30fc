"""backup and restore on real servers: a restored backend serves exactly what was served.

The store is filled through the CLI and a host (versions, a destroyed version leaving a
gap, a soft delete, mappings, get decisions in the access log). What it serves is then
recorded: `list`, `mappings`, every version a host can get, the audit history with the
access log, and each stream's sequence range. After `backup` the original server is
stopped and its data removed; a fresh server gets `restore`, a backend is started on it
with the same keys, and everything recorded must be equal. A damaged backup, a second
restore and a non-empty output folder are each refused in one line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from events.anchor import Anchor, Anchored
from secrets_nats_kv.app.backup import MANIFEST
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import ProtocolError
from secrets_nats_kv.nats.connection import connect
from support.cliproc import ok, one_line_error
from support.harness import Identity, Keys, cli_env, run_cli, spawn_run, wait_until_answering
from support.host import HostClient
from support.leakcheck import remembered

NAMES = BackendNames()
STREAMS = (
    "SECRETS_nats-kv_events",
    "SECRETS_nats-kv_anchor",
    "SECRETS_nats-kv_access",
    "KV_WASMCLOUD_SECRETS",
    "KV_SECRETS_nats-kv_state",
)


def env_for(server: NatsServer, keys: Keys) -> dict[str, str]:
    return cli_env(keys, NATS_ADDRESS=server.url.removeprefix("nats://"))


def running(server: NatsServer, keys: Keys, log: Path) -> subprocess.Popen[bytes]:
    proc = spawn_run(server.url, env_for(server, keys), log=log)
    anyio.run(wait_until_answering, server.url)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(15) == 0


async def host_view(url: str, who: Identity, names: list[str], top: int) -> dict[str, Any]:
    """What a host is served: every (name, version) up to `top`, value or not-found."""
    nc = await connect(NatsOptions(servers=(url,)), name="backup test", persistent=False)
    try:
        host = HostClient(nc, NAMES)
        seen: dict[str, Any] = {}
        for name in names:
            for version in [None, *range(1, top + 1)]:
                try:
                    secret = await host.get(
                        name,
                        entity_jwt=who.entity_jwt(),
                        host_jwt=who.host_jwt(),
                        version=None if version is None else str(version),
                    )
                    seen[f"{name}@{version}"] = (secret.version, secret.string_secret)
                except ProtocolError as exc:  # not found, not mapped: served as such
                    seen[f"{name}@{version}"] = exc.variant
        return seen
    finally:
        await nc.close()


async def stream_ranges(url: str) -> dict[str, tuple[int, int, int]]:
    nc = await connect(NatsOptions(servers=(url,)), name="backup test", persistent=False)
    try:
        js = nc.jetstream(timeout=5)
        ranges = {}
        for stream in STREAMS:
            state = (await js.stream_info(stream)).state
            ranges[stream] = (state.messages, state.first_seq, state.last_seq)
        return ranges
    finally:
        await nc.close()


async def anchored(url: str, keys: Keys) -> Anchored | None:
    """The anchor a backend on `url` would start from (verified with the encryption key)."""
    nc = await connect(NatsOptions(servers=(url,)), name="backup test", persistent=False)
    try:
        return await Anchor(nc, backend_name=NAMES.name, barrier=Barrier(keys.encryption)).read()
    finally:
        await nc.close()


def gets_recorded(env: dict[str, str]) -> int:
    audit = ok(run_cli("audit", "export", "--access", env=env))
    return sum('"type":"get"' in line for line in audit.splitlines())


def wait_for_access_log(env: dict[str, str], count: int) -> None:
    """The access log is written behind the gets: wait until it holds `count` of them."""
    end = time.monotonic() + 30
    while gets_recorded(env) < count:
        assert time.monotonic() < end, "the access log never caught up"
        time.sleep(0.05)  # poll a condition with a deadline


def served(server: NatsServer, keys: Keys, top: int) -> dict[str, Any]:
    """What the backend on `server` shows an operator (reading adds nothing to any log)."""
    env = env_for(server, keys)
    return {
        "audit": ok(run_cli("audit", "export", "--access", env=env)),
        "list": ok(run_cli("list", env=env)),
        "mappings": ok(run_cli("mappings", env=env)),
        "get": [
            run_cli("get", "bk-a", "--secret-version", str(v), env=env).stdout
            for v in range(1, top + 1)
        ],
    }


def test_backup_then_restore_into_a_fresh_server_after_the_original_is_gone(
    make_nats_server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    keys, who = Keys(), Identity()
    original = make_nats_server()
    proc = running(original, keys, tmp_path / "run-1.log")
    env = env_for(original, keys)

    def put(name: str) -> None:
        value = remembered(f"bk-{secrets.token_hex(8)}", "secret value")
        ok(run_cli("put", name, "--string", value, env=env))

    for name in ("bk-a", "bk-a", "bk-b", "bk-a", "bk-gone"):
        put(name)
    ok(run_cli("destroy", "bk-a", "--version", "2", env=env))  # a gap in the versions
    ok(run_cli("delete", "bk-gone", env=env))
    ok(run_cli("add-mapping", who.entity_key, "--secret", "bk-a", "--secret", "bk-b", env=env))
    top, names = 6, ["bk-a", "bk-b", "bk-gone"]
    host_before = anyio.run(host_view, original.url, who, names, top)
    wait_for_access_log(env, len(host_before))  # the backup holds these decisions
    before = served(original, keys, top)
    ranges = anyio.run(stream_ranges, original.url)
    anchor = anyio.run(anchored, original.url, keys)
    assert anchor is not None
    assert anchor.seq == ranges["SECRETS_nats-kv_events"][2]
    assert host_before["bk-a@2"] == "SecretNotFound"  # destroyed
    assert host_before["bk-a@1"][1] is not None
    assert host_before["bk-gone@None"] == "Unauthorized"  # never mapped
    assert before["audit"].count('"type":"get"') == len(host_before)

    backup = tmp_path / "backup"
    out = ok(run_cli("backup", "--output", str(backup), env=env))
    assert out.startswith(f"backed up nats-kv to {backup}: 5 streams")
    for path in backup.iterdir():  # no seed, in any form, in any file
        data = path.read_bytes()
        for key in (keys.transit, keys.encryption):
            assert key.seed.encode() not in data

    stop(proc)
    original.stop()
    shutil.rmtree(original.config.store_dir)  # the original is gone for good

    fresh = make_nats_server()
    restored = run_cli("restore", str(backup), env=env_for(fresh, keys))
    assert ok(restored).startswith(f"restored nats-kv from {backup}: 5 streams")
    assert anyio.run(stream_ranges, fresh.url) == ranges  # same sequences, gaps included
    # The anchor came back too (its tag names its own sequence, which the restore keeps):
    # a restored log cut back behind it is still refused.
    assert anyio.run(anchored, fresh.url, keys) == anchor
    proc = running(fresh, keys, tmp_path / "run-2.log")
    try:
        assert served(fresh, keys, top) == before
        assert anyio.run(host_view, fresh.url, who, names, top) == host_before
    finally:
        stop(proc)

    now = anyio.run(stream_ranges, fresh.url)
    again = run_cli("restore", str(backup), env=env_for(fresh, keys))
    one_line_error(again, "already exists", "restore only into a NATS")
    assert anyio.run(stream_ranges, fresh.url) == now  # refused: nothing touched


@pytest.fixture
def small_backup(make_nats_server: Callable[..., NatsServer], tmp_path: Path) -> tuple[Path, Keys]:
    keys = Keys()
    server = make_nats_server()
    proc = running(server, keys, tmp_path / "run.log")
    env = env_for(server, keys)
    ok(run_cli("put", "bk-small", "--string", remembered(secrets.token_hex(12), "value"), env=env))
    backup = tmp_path / "small"
    ok(run_cli("backup", "--output", str(backup), env=env))
    stop(proc)
    return backup, keys


def copy_of(backup: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(backup, target)
    return target


async def stream_names(url: str) -> list[str]:
    nc = await connect(NatsOptions(servers=(url,)), name="backup test", persistent=False)
    try:
        return [info.config.name for info in await nc.jetstream(timeout=5).streams_info()]
    finally:
        await nc.close()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "edit the manifest", "no manifest"])
def test_a_damaged_backup_is_refused_and_nothing_is_restored(
    damage: str,
    small_backup: tuple[Path, Keys],
    make_nats_server: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    backup, keys = small_backup
    broken = copy_of(backup, tmp_path, "broken")
    events = broken / "events.tar.s2"
    manifest = broken / MANIFEST
    if damage == "flip a byte":
        data = bytearray(events.read_bytes())
        data[len(data) // 2] ^= 0x01
        events.write_bytes(bytes(data))
    elif damage == "truncate":
        events.write_bytes(events.read_bytes()[:-1])
    elif damage == "edit the manifest":
        manifest.write_text(manifest.read_text().replace('"nats-kv"', '"nats-kx"'))
    else:
        manifest.unlink()
    target = make_nats_server()
    one_line_error(
        run_cli("restore", str(broken), env=env_for(target, keys)), "not a usable backup"
    )
    assert anyio.run(stream_names, target.url) == []


def test_backup_into_a_folder_that_is_not_empty_is_refused(
    small_backup: tuple[Path, Keys], make_nats_server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    backup, keys = small_backup
    server = make_nats_server()
    before = sorted(os.listdir(backup))
    one_line_error(
        run_cli("backup", "--output", str(backup), env=env_for(server, keys)), "not an empty folder"
    )
    assert sorted(os.listdir(backup)) == before


def test_backup_of_a_backend_that_is_not_there_names_it(
    make_nats_server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = make_nats_server()
    one_line_error(
        run_cli(
            "backup", "--output", str(tmp_path / "b"), "-n", "nobody", env=env_for(server, Keys())
        ),
        "SECRETS_nobody_events",
        "-n nobody",
    )
    assert not (tmp_path / "b").exists()


def run_with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run the CLI with stderr on a pseudo-terminal: its exit code, stdout, and the terminal."""
    import pty

    from support.harness import CLI, REPO

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [*CLI, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=terminal,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        try:
            while chunk := os.read(controller, 4096):
                shown += chunk
        except OSError:  # EIO: the other end is closed and everything was read
            pass
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return proc.returncode, proc.stdout, shown


def test_backup_and_restore_show_progress_on_a_terminal(
    make_nats_server: Callable[..., NatsServer], tmp_path: Path
) -> None:
    keys = Keys()
    server = make_nats_server()
    proc = running(server, keys, tmp_path / "run.log")
    env = env_for(server, keys)
    ok(
        run_cli(
            "put", "bk-progress", "--string", remembered(secrets.token_hex(12), "value"), env=env
        )
    )
    code, out, shown = run_with_terminal_stderr(["backup", "--output", str(tmp_path / "b")], env)
    stop(proc)
    assert code == 0, shown
    assert out.startswith(b"backed up nats-kv")
    assert b"\rbackup events [" in shown
    assert b"#########################]" in shown  # the bar reached 100%
    target = make_nats_server()
    code, out, shown = run_with_terminal_stderr(
        ["restore", str(tmp_path / "b")], env_for(target, keys)
    )
    assert code == 0, shown
    assert b"\rrestore events [" in shown
    # Not a terminal: no progress at all (the other tests' one-line checks rely on it).
    quiet = run_cli("backup", "--output", str(tmp_path / "c"), env=env_for(target, keys))
    assert ok(quiet).startswith("backed up nats-kv")
