"""`run`, `dev` and `rotate-key`: the commands that start the backend or rewrite its keys.

`run` builds the backend's configuration from the flags and the environment's seeds and
serves until a signal, then drains; `dev` does the same on a bundled nats-server. The
seeds are read here for every command: each reader finds the text (a variable, a file)
and `SeedSource` parses it, its refusals naming where the text came from.
Which function runs which command is `secrets_nats_kv.app.dispatch`; the client
commands are `admin_commands`, `get_command` and `operator_commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio

from secrets_nats_kv.app import logs
from secrets_nats_kv.app.arguments import backend_names, nats_options
from secrets_nats_kv.app.interrupts import Shutdown
from secrets_nats_kv.app.session import close as _close
from secrets_nats_kv.app.session import why_silent as _why_silent
from secrets_nats_kv.app.terminal import progress_printer
from secrets_nats_kv.app.terminal import say as _say
from secrets_nats_kv.app.workers import stop_when_orphaned, supervise_children
from secrets_nats_kv.config import BackendConfig
from secrets_nats_kv.errors import ConfigError, InvalidKey
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from actors.rotation import BackendKeys
    from projections.kv import KvLayout
    from secrets_nats_kv.config import BackendNames

log = logging.getLogger(__name__)
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class SeedSource:
    """Text that should hold a seed, and how an error names where it came from (a
    variable, a flag and its file, a file's line): never the text itself, nor its repr."""

    where: str
    text: str = field(repr=False)

    def parse(self, parse: Callable[[str], K]) -> K:
        """The key in the text (stripped); one line naming `where` if it holds none."""
        try:
            return parse(self.text.strip())
        except InvalidKey as exc:
            raise ConfigError(f"{self.where}: {exc}") from None


def read_seed_file(path: str, cannot_read: str, *, ascii_only: bool = False) -> str:
    """A seed file's text; if it cannot be read, one line: `cannot_read`, then why."""
    try:
        return Path(path).read_text(encoding="ascii" if ascii_only else "utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        undecodable = "not a seed" if ascii_only else "not UTF-8 text"
        why = (exc.strerror if isinstance(exc, OSError) else None) or undecodable
        raise ConfigError(f"{cannot_read}: {why}") from None


def seed_from_env(*names: str) -> XKey:
    """The curve key in the first of `names` that is set; a clear error if none is."""
    for name in names:
        text = os.environ.get(name)
        if text:
            return SeedSource(name, text).parse(XKey.from_seed)
    raise ConfigError(f"set {' or '.join(names)} to a curve seed (SX…)")


def audit_signer() -> SigningKey | None:
    """AUDIT_SIGNING_SEED (an account seed, SA…), or the file AUDIT_SIGNING_SEED_FILE
    names: signs the export's checkpoints (`audit export`) and each anchor (`run`)."""
    text = os.environ.get("AUDIT_SIGNING_SEED")
    path = os.environ.get("AUDIT_SIGNING_SEED_FILE")
    if text:
        source = SeedSource("AUDIT_SIGNING_SEED", text)
    elif path:
        where = "AUDIT_SIGNING_SEED_FILE"
        source = SeedSource(
            where, read_seed_file(path, f"{where}: cannot read {path}", ascii_only=True)
        )
    else:
        return None
    if not source.text:
        return None  # an empty file, as an empty variable, is no signer
    return source.parse(lambda seed: SigningKey.from_seed(seed, Role.ACCOUNT))


def previous_transit_keys(args: argparse.Namespace) -> tuple[XKey, ...]:
    """PREVIOUS_TRANSIT_XKEY_SEEDS (comma-separated) and --previous-transit-xkey-seeds-file."""
    items = os.environ.get("PREVIOUS_TRANSIT_XKEY_SEEDS", "").split(",")
    sources = [
        SeedSource(f"previous transit key (PREVIOUS_TRANSIT_XKEY_SEEDS item {i})", item)
        for i, item in enumerate(items, 1)
        if item.strip()
    ]
    path = getattr(args, "previous_transit_xkey_seeds_file", None)
    if path:
        listed = read_seed_file(path, f"--previous-transit-xkey-seeds-file: cannot read {path}")
        sources += [
            SeedSource(f"previous transit key ({path} line {n})", line)
            for n, line in enumerate(listed.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return tuple(source.parse(XKey.from_seed) for source in sources)


# --- run ---------------------------------------------------------------------------------


def next_encryption_key(args: argparse.Namespace) -> XKey | None:
    """NEXT_ENCRYPTION_XKEY_SEED or --next-encryption-xkey-seed-file: the key an online
    rotation moves to, held beside the current one (None when neither is given)."""
    path = getattr(args, "next_encryption_xkey_seed_file", None)
    text = os.environ.get("NEXT_ENCRYPTION_XKEY_SEED", "").strip()
    if path:
        if text:
            raise ConfigError(
                "give NEXT_ENCRYPTION_XKEY_SEED or --next-encryption-xkey-seed-file, not both"
            )
        where = f"--next-encryption-xkey-seed-file {path}"
        source = SeedSource(where, read_seed_file(path, f"{where}: cannot read it"))
        if not source.text.strip():
            raise ConfigError(f"{where}: the file holds no curve seed (SX…)")
    elif text:
        source = SeedSource("NEXT_ENCRYPTION_XKEY_SEED", text)
    else:
        return None
    return source.parse(XKey.from_seed)


def backend_config(args: argparse.Namespace) -> BackendConfig:
    for key in (*args.admin_xkey, *args.trusted_issuer):
        if not key:
            raise ConfigError("empty key in --admin-xkey/--trusted-issuer")
    try:
        admin_keys = tuple(XKey.from_public(k).public_key for k in args.admin_xkey)
    except InvalidKey as exc:
        raise ConfigError(f"--admin-xkey: {exc}") from None
    return BackendConfig(
        transit_key=seed_from_env("TRANSIT_XKEY_SEED"),
        previous_transit_keys=previous_transit_keys(args),
        encryption_key=seed_from_env("ENCRYPTION_XKEY_SEED"),
        next_encryption_key=next_encryption_key(args),
        names=backend_names(args),
        nats=nats_options(args),
        max_secret_history=args.max_secret_history,
        replicas=args.replicas,
        access_log_max_bytes=args.access_log_max_bytes,
        access_log_max_age_days=args.access_log_max_age_days,
        admin_xkeys=admin_keys,
        insecure_unauthenticated_admin=args.insecure_unauthenticated_admin,
        trusted_issuers=tuple(args.trusted_issuer),
        access_log=not args.no_access_log,
        audit_signing_key=audit_signer(),
    )


async def run_until_signalled(
    backend_config_: BackendConfig,
    shutdown: Shutdown,
    *,
    argv: list[str] | None = None,
    workers: int = 1,
) -> int:
    """Run a backend (and `workers - 1` child backends) until `shutdown`, then drain.

    `shutdown.clean` is set when the backend stopped in order: it never got as far as
    taking requests, or it answered every request it had taken while NATS was reachable.
    """
    from actors.backend import Backend

    backend = Backend(backend_config_)
    if backend_config_.insecure_unauthenticated_admin:
        log.warning(
            "--insecure-unauthenticated-admin: anyone who can publish on the subject "
            "can write secrets and grant access"
        )
    if not backend_config_.trusted_issuers:
        log.warning(
            "no --trusted-issuer: any host with a self-made JWT can fetch any mapped secret"
        )
    stopping = anyio.Event()
    connected_at_stop = [False]
    async with anyio.create_task_group() as tg:

        async def stop_on_request() -> None:
            await shutdown.requested.wait()
            log.info(
                "stopping: draining requests in flight", extra={"signal": shutdown.signal_name}
            )
            stop()

        def stop() -> None:
            if not stopping.is_set():
                connected_at_stop[0] = backend.nc is not None and backend.nc.is_connected
                stopping.set()
                backend.stop()
            if not backend.ready.is_set():
                tg.cancel_scope.cancel()  # still connecting or catching up: nothing to drain

        async def serve() -> None:
            await backend.run()
            tg.cancel_scope.cancel()  # the backend has stopped: nothing left to wait for

        tg.start_soon(stop_on_request)
        tg.start_soon(serve)
        tg.start_soon(stop_when_orphaned, stopping, stop)
        if workers > 1 and argv is not None:
            tg.start_soon(supervise_children, argv, workers - 1, stopping)
    pool = backend.pool
    drained = pool is not None and pool.finished.is_set() and connected_at_stop[0]
    shutdown.clean = not backend.ready.is_set() or drained
    if not connected_at_stop[0]:
        shutdown.why_unclean = "while NATS was unreachable: replies in flight may be lost"
    return 0


async def cmd_run(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, args.log_level)
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    return await run_until_signalled(
        backend_config(args), args.shutdown, argv=args.argv, workers=args.workers
    )


async def cmd_dev(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app import dev

    logs.configure(args.log_format, args.log_level)
    if args.dev_command == "rotate-key":
        return await dev.rotate_dev_key(args.data_dir, args.nats_address)
    return await dev.run_dev(
        args.data_dir, args.nats_address, args.shutdown, next_key=next_encryption_key(args)
    )


async def cmd_rotate_key(args: argparse.Namespace) -> int:
    from actors.rotation import rotate_key
    from projections.kv import KvLayout

    old = seed_from_env("ENCRYPTION_XKEY_SEED")
    names = backend_names(args)
    layout = KvLayout(
        secrets_bucket=names.secrets_bucket,
        state_bucket=names.state_bucket,
        max_history=args.max_secret_history,
        replicas=args.replicas,
    )
    if args.abort:
        return await _abort_rotation(args, names, layout, old)
    new = seed_from_env("NEW_ENCRYPTION_XKEY_SEED")
    signer = audit_signer()  # read before connecting: a bad seed changes nothing
    nc = await connect(nats_options(args), name="secrets-nats-kv rotate-key", persistent=False)
    try:
        if (refused := await _why_silent(nc, args)) is not None:
            raise refused  # the original's buckets: import them before rotating
        report = await rotate_key(
            nc,
            names=names,
            layout=layout,
            old=old,
            new=new,
            force=args.force,
            dry_run=args.dry_run,
            progress=progress_printer("rotate-key"),
            online=args.online,
            backends=await _answering_backends(nc, names) if args.online else (),
            signer=signer,
        )
    finally:
        await _close(nc)
    _say(report.summary())
    return 0


async def _answering_backends(nc: NATS, names: BackendNames) -> list[BackendKeys]:
    """The backends answering `status`'s stats request, with the keys they hold."""
    from actors.rotation import BackendKeys
    from secrets_nats_kv.app.status import gather

    return [BackendKeys.of(i.id, i.keys) for i in await gather(nc, names, 1.0)]


async def _abort_rotation(
    args: argparse.Namespace, names: BackendNames, layout: KvLayout, old: XKey
) -> int:
    from actors.rotation import abort_rotation

    nc = await connect(nats_options(args), name="secrets-nats-kv rotate-key", persistent=False)
    try:
        said = await abort_rotation(nc, names=names, layout=layout, old=old)
    finally:
        await _close(nc)
    _say(said)
    return 0
