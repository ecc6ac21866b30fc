"""`secrets-nats-kv dev`: a working backend in one command, for development only.

Starts the bundled nats-server with JetStream in a data folder, makes a transit and an
encryption seed on first start (kept there, mode 0600, reused after), prints them as
`export` lines, and runs the backend until Ctrl-C, then stops both in order.

Seeds in the environment (ENCRYPTION_XKEY_SEED, TRANSIT_XKEY_SEED) win over the stored
ones: after a rotation, or when a developer points `dev` at keys of their own.

Its nats-server never outlives it: on Linux the kernel sends it SIGTERM when `dev` dies,
however it dies (`kill -9` included); and nats-server writes its pid file in the data
folder, so a later `dev` on the same folder finds a server left by a `dev` that could
not stop it (another OS, a machine crash mid-start) and stops it, after checking by its
command line that it is that folder's server. Nothing is ever stopped by name.

`dev rotate-key` rotates the dev store in one command: with `dev` stopped, it starts the
folder's server, re-encrypts under a fresh key, and makes that key the stored one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

from secrets_nats_kv.app.interrupts import Shutdown
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig, port_in_use
from secrets_nats_kv.config import BackendConfig, BackendNames, NatsOptions
from secrets_nats_kv.errors import ConfigError, InvalidKey
from secrets_nats_kv.xkeys import XKey

WARNING = """\
##########################################################################
#  DEVELOPMENT ONLY: these seeds are stored unencrypted in {folder}
#  Never use this mode or these keys for anything that matters.
##########################################################################"""

SERVER_NAME = "secrets-nats-kv-dev"
PID_FILE = "nats-server.pid"
_ORPHAN_STOP_S = 10.0


def split_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if "://" in address or not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--nats-address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port_text)


def _write_seed(path: Path, key: XKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.seed + "\n")


def load_or_create_seed(path: Path) -> XKey:
    """The seed in `path`, or a fresh one written there with mode 0600."""
    if path.exists():
        return read_seed(path)
    key = XKey.generate()
    _write_seed(path, key)
    return key


def read_seed(path: Path) -> XKey:
    try:
        return XKey.from_seed(path.read_text(encoding="ascii").strip())
    except (InvalidKey, UnicodeDecodeError):
        raise ConfigError(f"{path} holds no curve seed; remove it to start over") from None


def _env_seed(name: str) -> XKey | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return XKey.from_seed(text)
    except InvalidKey as exc:
        raise ConfigError(f"{name}: {exc}") from None


def prepare_folder(data_dir: str) -> tuple[Path, XKey, XKey]:
    """The data folder (made 0700 if new) and the transit and encryption keys to use.

    A seed in the environment wins over the stored one (which is then neither read nor
    written): the environment is what the developer just chose.
    """
    folder = Path(data_dir).resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    transit = _env_seed("TRANSIT_XKEY_SEED") or load_or_create_seed(folder / "transit.seed")
    encryption = _env_seed("ENCRYPTION_XKEY_SEED") or load_or_create_seed(
        folder / "encryption.seed"
    )
    return folder, transit, encryption


def server_config(folder: Path, host: str, port: int) -> NatsServerConfig:
    directory = folder / "nats"
    return NatsServerConfig.in_dir(
        directory,
        server_name=SERVER_NAME,
        host=host,
        port=port,
        extra_conf=f"pid_file: {_quoted(directory / PID_FILE)}",
    )


def _quoted(path: Path) -> str:
    import json

    return json.dumps(str(path))


def _command_line(pid: int) -> str | None:
    """The command line of `pid`, or None if no such process (or it cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
    except OSError:
        return None
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="], capture_output=True, check=False, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.decode(errors="replace").strip()
    return text or None


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (from /proc, else ps), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[1])  # after "pid (comm) state"
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "ppid="], capture_output=True, check=False, timeout=5
        )
        return int(out.stdout.decode().strip())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def stop_orphan(folder: Path) -> int | None:
    """Stop a nats-server an earlier `dev` on `folder` left running; its pid, if there was one.

    Only a process whose command line names this folder's config file is ours; a stale
    pid file (the pid reused by something else) is left alone and removed. A server whose
    parent is a live `secrets-nats-kv` is no orphan: that `dev` still runs, and is refused.
    """
    pid_file = folder / "nats" / PID_FILE
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except OSError:
        return None
    conf = str(folder / "nats" / f"{SERVER_NAME}.conf")
    if not text.isdigit():
        pid_file.unlink(missing_ok=True)
        return None
    pid = int(text)
    command = _command_line(pid)
    if command is None or conf not in command or "nats-server" not in command:
        pid_file.unlink(missing_ok=True)
        return None
    parent = _parent_of(pid)
    parent_command = _command_line(parent) if parent not in (None, 0, 1) else None
    if parent_command is not None and "secrets" in parent_command and "nats" in parent_command:
        raise ConfigError(
            f"a dev is running on {folder} (pid {parent}, its nats-server {pid}): stop `dev` first"
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _ORPHAN_STOP_S
    while _command_line(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling another process's exit: there is no event to wait on
    if _command_line(pid) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


def _claim_address(data_dir: str, address: str) -> tuple[str, int]:
    """Stop this folder's orphaned server, if any; then the address must be free."""
    host, port = split_address(address)
    folder = Path(data_dir).resolve()
    orphan = stop_orphan(folder) if folder.exists() else None
    if orphan is not None:
        sys.stderr.write(
            f"secrets-nats-kv: stopped nats-server {orphan} left running by an earlier dev\n"
        )
    if port_in_use(host, port):
        raise ConfigError(
            f"{host}:{port} is already in use; stop what listens there or pass --nats-address"
        )
    return host, port


def _start_server(folder: Path, host: str, port: int) -> tuple[NatsServer, NatsServerConfig]:
    config = server_config(folder, host, port)
    server = NatsServer(config, die_with_parent=True)
    server.launch()  # here, on the main thread: the parent-death signal follows this thread
    return server, config


async def _ready(server: NatsServer) -> None:
    try:
        await anyio.to_thread.run_sync(server.wait_ready)
    except BaseException:
        await anyio.to_thread.run_sync(server.stop)
        raise


async def run_dev(
    data_dir: str, address: str, shutdown: Shutdown, *, next_key: XKey | None = None
) -> int:
    from secrets_nats_kv.app.commands import run_until_signalled

    host, port = _claim_address(data_dir, address)
    folder, transit, encryption = prepare_folder(data_dir)
    server, config = _start_server(folder, host, port)
    try:
        await _ready(server)
        out = sys.stdout
        out.write(WARNING.format(folder=folder) + "\n")
        out.write(f"export TRANSIT_XKEY_SEED={transit.seed}\n")
        out.write(f"export ENCRYPTION_XKEY_SEED={encryption.seed}\n")
        out.write(f"export NATS_ADDRESS={host}:{port}\n")
        out.write(f"# NATS with JetStream at {config.url}, data in {folder}\n")
        out.flush()
        backend = BackendConfig(
            transit_key=transit,
            encryption_key=encryption,
            next_encryption_key=next_key,
            nats=NatsOptions(servers=(config.url,)),
        )
        return await run_until_signalled(backend, shutdown)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)


async def rotate_dev_key(data_dir: str, address: str) -> int:
    """Re-encrypt the dev store under a fresh key and make it the stored encryption key.

    The new seed is written (as `encryption.seed.next`) before anything is re-encrypted,
    so a crash leaves both keys on disk and a re-run finishes with the same new key; the
    old seed is kept as `encryption.seed.previous`.
    """
    from actors.rotation import rotate_key
    from projections.kv import KvLayout
    from secrets_nats_kv.app.commands import progress_printer

    host, port = _claim_address(data_dir, address)
    folder, _, old = prepare_folder(data_dir)
    stored = folder / "encryption.seed"
    pending = folder / "encryption.seed.next"
    new = read_seed(pending) if pending.exists() else None
    if new is None:
        new = XKey.generate()
        _write_seed(pending, new)
    server, config = _start_server(folder, host, port)
    try:
        await _ready(server)
        from secrets_nats_kv.nats.connection import connect

        names = BackendNames()
        nc = await connect(
            NatsOptions(servers=(config.url,)), name="secrets-nats-kv dev", persistent=False
        )
        try:
            report = await rotate_key(
                nc,
                names=names,
                layout=KvLayout(
                    secrets_bucket=names.secrets_bucket, state_bucket=names.state_bucket
                ),
                old=old,
                new=new,
                force=False,
                dry_run=False,
                progress=progress_printer("rotate-key"),
            )
        finally:
            with anyio.move_on_after(2, shield=True):
                await nc.close()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
    previous = folder / "encryption.seed.previous"
    if stored.exists():
        os.replace(stored, previous)
    os.replace(pending, stored)
    sys.stdout.write(report.summary() + "\n")
    sys.stdout.write(f"export ENCRYPTION_XKEY_SEED={new.seed}\n")
    sys.stdout.write(f"# the new key is kept in {stored}; the old one in {previous}\n")
    sys.stdout.flush()
    return 0
