"""`secrets-nats-kv dev`: a working backend in one command, for development only.

Starts the bundled nats-server with JetStream in a data folder, makes a transit and an
encryption seed on first start (kept there, mode 0600, reused after), prints them as
`export` lines, and runs the backend until Ctrl-C, then stops both in order.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig, port_in_use
from secrets_nats_kv.config import BackendConfig, NatsOptions
from secrets_nats_kv.errors import ConfigError, InvalidKey
from secrets_nats_kv.xkeys import XKey

WARNING = """\
##########################################################################
#  DEVELOPMENT ONLY: these seeds are stored unencrypted in {folder}
#  Never use this mode or these keys for anything that matters.
##########################################################################"""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if "://" in address or not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--nats-address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port_text)


def load_or_create_seed(path: Path) -> XKey:
    """The seed in `path`, or a fresh one written there with mode 0600."""
    if path.exists():
        try:
            return XKey.from_seed(path.read_text(encoding="ascii").strip())
        except (InvalidKey, UnicodeDecodeError):
            raise ConfigError(f"{path} holds no curve seed; remove it to start over") from None
    key = XKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.seed + "\n")
    return key


def prepare_folder(data_dir: str) -> tuple[Path, XKey, XKey]:
    """The data folder (made 0700 if new) and the transit and encryption keys kept in it."""
    folder = Path(data_dir).resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    transit = load_or_create_seed(folder / "transit.seed")
    encryption = load_or_create_seed(folder / "encryption.seed")
    return folder, transit, encryption


async def run_dev(data_dir: str, address: str) -> int:
    from secrets_nats_kv.app.commands import run_until_signalled

    host, port = split_address(address)
    if port_in_use(host, port):
        raise ConfigError(
            f"{host}:{port} is already in use; stop what listens there or pass --nats-address"
        )
    folder, transit, encryption = prepare_folder(data_dir)
    server_config = NatsServerConfig.in_dir(
        folder / "nats", server_name="secrets-nats-kv-dev", host=host, port=port
    )
    server = NatsServer(server_config)
    await anyio.to_thread.run_sync(server.start)
    try:
        out = sys.stdout
        out.write(WARNING.format(folder=folder) + "\n")
        out.write(f"export TRANSIT_XKEY_SEED={transit.seed}\n")
        out.write(f"export ENCRYPTION_XKEY_SEED={encryption.seed}\n")
        out.write(f"export NATS_ADDRESS={host}:{port}\n")
        out.write(f"# NATS with JetStream at {server_config.url}, data in {folder}\n")
        out.flush()
        config = BackendConfig(
            transit_key=transit,
            encryption_key=encryption,
            nats=NatsOptions(servers=(server_config.url,)),
        )
        return await run_until_signalled(config)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
