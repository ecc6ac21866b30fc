"""`run`, `dev` and `rotate-key`: the commands that start the backend or rewrite its keys.

`run` builds the backend's configuration from the flags and the environment's seeds and
serves until a signal, then drains; `dev` does the same on a bundled nats-server. The
seeds are read here (`seed_from_env`, `previous_transit_keys`) for every command.
Which function runs which command is `secrets_nats_kv.app.dispatch`; the client
commands are `admin_commands`, `get_command` and `operator_commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

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


def seed_from_env(*names: str) -> XKey:
    """The curve key in the first of `names` that is set; a clear error if none is."""
    for name in names:
        text = os.environ.get(name)
        if text:
            try:
                return XKey.from_seed(text.strip())
            except InvalidKey as exc:
                raise ConfigError(f"{name}: {exc}") from None
    raise ConfigError(f"set {' or '.join(names)} to a curve seed (SX…)")


def audit_signer() -> SigningKey | None:
    """AUDIT_SIGNING_SEED (an account seed, SA…), or the file AUDIT_SIGNING_SEED_FILE
    names: signs the export's checkpoints (`audit export`) and each anchor (`run`)."""
    source, text = "AUDIT_SIGNING_SEED", os.environ.get("AUDIT_SIGNING_SEED")
    path = os.environ.get("AUDIT_SIGNING_SEED_FILE")
    if not text and path:
        source = "AUDIT_SIGNING_SEED_FILE"
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a seed"
            raise ConfigError(f"{source}: cannot read {path}: {reason}") from None
    if not text:
        return None
    try:
        return SigningKey.from_seed(text.strip(), Role.ACCOUNT)
    except InvalidKey as exc:
        raise ConfigError(f"{source}: {exc}") from None


def previous_transit_keys(args: argparse.Namespace) -> tuple[XKey, ...]:
    """PREVIOUS_TRANSIT_XKEY_SEEDS (comma-separated) and --previous-transit-xkey-seeds-file."""
    texts = [
        (f"PREVIOUS_TRANSIT_XKEY_SEEDS item {i + 1}", t.strip())
        for i, t in enumerate(os.environ.get("PREVIOUS_TRANSIT_XKEY_SEEDS", "").split(","))
        if t.strip()
    ]
    path = getattr(args, "previous_transit_xkey_seeds_file", None)
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--previous-transit-xkey-seeds-file: cannot read {path}: "
                f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}"
            ) from None
        texts += [
            (f"{path} line {n}", line.strip())
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    keys: list[XKey] = []
    for where, text in texts:
        try:
            keys.append(XKey.from_seed(text))
        except InvalidKey as exc:
            raise ConfigError(f"previous transit key ({where}): {exc}") from None
    return tuple(keys)


# --- run ---------------------------------------------------------------------------------


def next_encryption_key(args: argparse.Namespace) -> XKey | None:
    """NEXT_ENCRYPTION_XKEY_SEED or --next-encryption-xkey-seed-file: the key an online
    rotation moves to, held beside the current one (None when neither is given)."""
    path = getattr(args, "next_encryption_xkey_seed_file", None)
    text = os.environ.get("NEXT_ENCRYPTION_XKEY_SEED", "").strip()
    where = "NEXT_ENCRYPTION_XKEY_SEED"
    if path:
        if text:
            raise ConfigError(
                "give NEXT_ENCRYPTION_XKEY_SEED or --next-encryption-xkey-seed-file, not both"
            )
        where = f"--next-encryption-xkey-seed-file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{where}: cannot read it: {why}") from None
        if not text:
            raise ConfigError(f"{where}: the file holds no curve seed (SX…)")
    if not text:
        return None
    try:
        return XKey.from_seed(text)
    except InvalidKey as exc:
        raise ConfigError(f"{where}: {exc}") from None


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
