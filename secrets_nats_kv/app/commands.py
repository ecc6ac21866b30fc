"""What each CLI command does, once `cli` has parsed it.

Client commands print one line (or, for `get`, the value) and raise the project's errors
for `cli.main` to turn into one-line failures. `run` and `dev` start the actors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv import config
from secrets_nats_kv.app import import_command, logs
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.interrupts import Shutdown
from secrets_nats_kv.app.workers import stop_when_orphaned, supervise_children
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import BackendConfig, BackendNames, NatsOptions
from secrets_nats_kv.errors import (
    BackendNotAnswering,
    ConfigError,
    DecryptionError,
    InvalidKey,
    InvalidRequest,
    InvalidSecretName,
    SecretNotFound,
    SecretsBackendError,
    Unauthorized,
)
from secrets_nats_kv.naming import validate_entity, validate_secret_name
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import to_backend_error as convert
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.permissions import NatsRole, inbox_prefix
from secrets_nats_kv.xkeys import XKey

if TYPE_CHECKING:
    from actors.rotation import BackendKeys
    from projections.kv import KvLayout

log = logging.getLogger(__name__)


def nats_options(args: argparse.Namespace) -> NatsOptions:
    return NatsOptions(
        servers=config.server_urls(args.nats_address),
        creds_file=getattr(args, "nats_creds_file", None),
        nkey_seed_file=getattr(args, "nats_nkey_seed_file", None),
        user=getattr(args, "nats_user", None),
        password=getattr(args, "nats_password", None),
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        inbox_prefix=_admin_inbox(args),
    )


def _admin_inbox(args: argparse.Namespace) -> str | None:
    """The CLI's reply inboxes, apart from the hosts' (see secrets_nats_kv.permissions)."""
    if not hasattr(args, "backend_name"):
        return None
    return inbox_prefix(backend_names(args), NatsRole.ADMIN)


def backend_names(args: argparse.Namespace) -> BackendNames:
    return BackendNames(
        name=args.backend_name,
        subject_base=args.subject_base,
        api_version=args.secrets_api_version,
        queue_base=args.nats_queue_base,
        secrets_bucket=getattr(args, "secrets_bucket", config.DEFAULT_SECRETS_BUCKET),
    )


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


def rewrite_layout(args: argparse.Namespace) -> KvLayout:
    """The buckets `rebuild` and `repair` recreate, with the run's settings from `args`."""
    from projections.kv import KvLayout

    names = backend_names(args)
    return KvLayout(
        secrets_bucket=names.secrets_bucket,
        state_bucket=names.state_bucket,
        max_history=args.max_secret_history,
        replicas=args.replicas,
    )


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- run ---------------------------------------------------------------------------------


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


# --- client commands -----------------------------------------------------------------------


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 version`, `2 versions`: output a person reads without wincing."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _refuse_bucket(args: argparse.Namespace) -> None:
    """`-b` on a command the backend answers: refused, never silently ignored."""
    if getattr(args, "refused_bucket", None) is not None:
        raise ConfigError(
            f"{args.command} -b/--secrets-bucket: the backend answers this with its own "
            "bucket (set it with `run -b`); drop -b here, or pick the backend with -n/--name"
        )


async def _close(nc: NATS) -> None:
    """Close a CLI connection even while being cancelled (a signal), within a bound."""
    with anyio.move_on_after(2, shield=True), contextlib.suppress(OSError):
        await nc.close()


@contextlib.asynccontextmanager
async def _admin_session(args: argparse.Namespace) -> AsyncIterator[AdminClient]:
    """An admin client, closed on exit; a refusal says which key was refused and why.

    The wire carries only the bare `Unauthorized`, whose own text ("not allowed") would
    leave the operator guessing which of their seeds is wrong. A `-t` flag wins over
    ADMIN_XKEY_SEED (it was given for this run); otherwise ADMIN_XKEY_SEED wins.
    """
    _refuse_bucket(args)
    if "transit_xkey_seed" in getattr(args, "seed_flags", ()):
        admin_key = seed_from_env("TRANSIT_XKEY_SEED")
    else:
        admin_key = seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED")
    transit, confirm = pinned_transit(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv cli", persistent=False)
    names = backend_names(args)
    client = AdminClient(nc, names, admin_key, transit=transit, confirm_transit=confirm)
    try:
        yield client
    except BackendNotAnswering as silence:
        reason = await _why_silent(nc, args)  # the original's buckets, not yet imported?
        if reason is not None:
            raise reason from None
        raise ConfigError(
            f"{silence}: {args.command} needs a running backend; start one with "
            f"`secrets-nats-kv run` (or `dev`), with -n {names.name} if it is not the default"
        ) from None
    except Unauthorized:
        raise ConfigError(
            f"Unauthorized: the backend refused admin key {admin_key.public_key} "
            "(sign with its TRANSIT_XKEY_SEED or an ADMIN_XKEY_SEED given to it with "
            "--admin-xkey; or this machine's clock is more than "
            f"{config.REQUEST_CLOCK_SKEW_S} s off)"
        ) from None
    finally:
        await _close(nc)


async def _why_silent(nc: NATS, args: argparse.Namespace) -> SecretsBackendError | None:
    """The buckets' reason no backend answers (they are the original's), if that is it."""
    from events.log import EventLog
    from projections.foreign import why_no_backend

    names = backend_names(args)
    try:
        log_exists = await EventLog(nc, backend_name=names.name, barrier=None).exists()
    except SecretsBackendError:
        return None
    return await why_no_backend(nc, names.secrets_bucket, names.state_bucket, log_exists=log_exists)


def pinned_transit(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The transit public key to seal to, and whether the bus's answer must confirm it.

    TRANSIT_XKEY_SEED: its public key, never asked of the bus. Else TRANSIT_XKEY or
    --transit-xkey: that key, and a `server_xkey` answer that differs is refused. Else
    the bus's answer, said once on stderr.
    """
    if os.environ.get("TRANSIT_XKEY_SEED"):
        return seed_from_env("TRANSIT_XKEY_SEED").public_key, False
    text = getattr(args, "transit_xkey", None) or os.environ.get("TRANSIT_XKEY")
    if text:
        try:
            return XKey.from_public(text.strip()).public_key, True
        except InvalidKey as exc:
            raise ConfigError(f"TRANSIT_XKEY / --transit-xkey: {exc}") from None
    sys.stderr.write(
        "secrets-nats-kv: warning: sealing to the transit key the bus answers with "
        "(set TRANSIT_XKEY or --transit-xkey to pin it)\n"
    )
    return None, False


def _valid_name(name: str) -> str:
    try:
        return validate_secret_name(name)
    except InvalidSecretName as exc:
        raise ConfigError(str(exc)) from None


def _put_value(args: argparse.Namespace) -> str | bytes:
    """The value to store: a flag wins over the environment; exactly one source."""
    string_value, binary_file = args.string, args.binary
    if string_value is None and binary_file is None:
        string_value = os.environ.get("SECRET_STRING_VALUE")
        binary_file = os.environ.get("SECRET_BINARY_FILE")
        if string_value is not None and binary_file:
            raise ConfigError("both SECRET_STRING_VALUE and SECRET_BINARY_FILE are set")
    if string_value is not None:
        return str(string_value)
    if not binary_file:
        raise ConfigError("give --string, --binary FILE, SECRET_STRING_VALUE or SECRET_BINARY_FILE")
    try:
        with open(binary_file, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {binary_file}: {exc.strerror}") from None


async def cmd_put(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    value = _put_value(args)
    if args.secret_version is not None:
        sys.stderr.write(
            "secrets-nats-kv: warning: put --secret-version is ignored: the backend assigns "
            "versions (the original ignored it too)\n"
        )
    async with _admin_session(args) as client:
        revision = await client.put_secret(name, value)
    _say(f"stored {name} as version {revision}")
    return 0


async def _mapping(args: argparse.Namespace, add: bool) -> int:
    try:
        entity = validate_entity(args.entity)
    except InvalidKey as exc:
        raise ConfigError(f"PUBKEY: {exc}") from None
    names = [_valid_name(name) for name in args.secret]
    async with _admin_session(args) as client:
        if add:
            await client.add_mapping(entity, names)
        else:
            await client.remove_mapping(entity, names)
    verb = "may now read" if add else "may no longer read"
    _say(f"{entity} {verb} {', '.join(names)}")
    return 0


async def cmd_add_mapping(args: argparse.Namespace) -> int:
    return await _mapping(args, add=True)


async def cmd_remove_mapping(args: argparse.Namespace) -> int:
    return await _mapping(args, add=False)


def _stored_kind(headers: dict[str, str], value: bytes) -> str:
    """How the value was stored: our kind header, else the original's rule (UTF-8 is a string)."""
    kind = headers.get(config.KIND_HEADER)
    if kind in ("string", "binary"):
        return kind
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "string"


async def cmd_get(args: argparse.Namespace) -> int:
    """Read the KV bucket directly, as the original does, and open with the encryption key."""
    name = _valid_name(args.name)
    encryption = seed_from_env("ENCRYPTION_XKEY_SEED")
    names = backend_names(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv cli", persistent=False)
    stream = config.kv_stream(names.secrets_bucket)
    subject = f"$KV.{names.secrets_bucket}.{name}"
    try:
        js = nc.jetstream(timeout=5)
        try:
            if args.secret_version is not None:
                msg = await js.get_msg(stream, seq=args.secret_version)
                if msg.subject != subject:
                    raise SecretNotFound(name, args.secret_version)
            else:
                msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            raise SecretNotFound(name, args.secret_version) from None
        except nats.errors.Error as exc:
            raise convert(f"read {name}", exc) from None
    finally:
        await _close(nc)
    headers = msg.headers or {}
    barrier = Barrier(encryption)
    tag = headers.get(KV_TAG_HEADER)
    if not barrier.verify_kv(names.secrets_bucket, name, msg.seq or 0, msg.data or b"", tag):
        raise ConfigError(
            f"{name} version {msg.seq} in {names.secrets_bucket} was not written by the "
            f"backend with this ENCRYPTION_XKEY_SEED ({encryption.public_key}): refusing it "
            "(the key may be wrong, the store rotated to a new key with rotate-key, or the "
            "entry is not the backend's)"
        )
    if headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
        raise SecretNotFound(name, args.secret_version)
    try:
        value = barrier.open(msg.data)
    except DecryptionError:
        raise ConfigError(
            f"{name} version {msg.seq} does not open with this ENCRYPTION_XKEY_SEED "
            f"({encryption.public_key}): the key may be wrong, or the store was rotated to a "
            "new key with rotate-key"
        ) from None
    kind = _stored_kind(headers, value)
    if args.kind is not None and args.kind != kind:
        raise ConfigError(
            f"secret {name} was in {kind} format, but {args.kind} format was requested"
        )
    if args.output:
        try:
            await anyio.Path(args.output).write_bytes(value)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.output}: {exc.strerror}") from None
        _say(f"wrote {plural(len(value), 'byte')} of {name} version {msg.seq} to {args.output}")
    elif kind == "binary":
        if sys.stdout.isatty():
            raise ConfigError(
                f"{name} is binary ({plural(len(value), 'byte')}) and stdout is a terminal: "
                "give --output FILE or pipe the output"
            )
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    else:
        _say(value.decode("utf-8", errors="replace"))
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    async with _admin_session(args) as client:
        listing = await client.list_secrets()
    if not listing:
        _say("no secrets")
    for item in listing:
        state = " (deleted)" if item.deleted else ""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.updated_at))
        versions = plural(item.versions, "version")
        _say(f"{item.name}\tversion {item.version}\t{versions}\t{when}{state}")
    return 0


async def cmd_mappings(args: argparse.Namespace) -> int:
    entity = None
    if args.entity is not None:
        try:
            entity = validate_entity(args.entity)
        except InvalidKey as exc:
            raise ConfigError(f"PUBKEY: {exc}") from None
    async with _admin_session(args) as client:
        mappings = await client.mappings(entity)
    if not any(mappings.values()):
        _say("no mappings")
    for key, names in mappings.items():
        if names:
            _say(f"{key}\t{', '.join(names)}")
    return 0


async def cmd_delete(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    async with _admin_session(args) as client:
        try:
            revision = await client.delete(name)
        except SecretNotFound:
            raise SecretNotFound(name) from None
    _say(f"deleted {name} (revision {revision}); undelete restores it")
    return 0


async def cmd_undelete(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    async with _admin_session(args) as client:
        try:
            revision = await client.undelete(name)
        except SecretNotFound:
            raise SecretNotFound(name) from None
        except InvalidRequest:  # the only request undelete can get wrong: a live secret
            raise ConfigError(f"secret {name!r} is not deleted: nothing to undelete") from None
    _say(f"restored {name} as version {revision}")
    return 0


async def cmd_destroy(args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    async with _admin_session(args) as client:
        try:
            destroyed = await client.destroy(name, version=args.secret_version, all=args.all)
        except SecretNotFound:
            raise SecretNotFound(name, args.secret_version) from None
    versions = ", ".join(str(v) for v in destroyed) or "none"
    word = "revision" if len(destroyed) == 1 else "revisions"
    _say(f"destroyed {name} {word} {versions}: their bytes are erased")
    return 0


async def cmd_rebuild(args: argparse.Namespace) -> int:
    from projections.rebuild import rebuild_views
    from secrets_nats_kv.barrier import Barrier

    encryption = seed_from_env("ENCRYPTION_XKEY_SEED")
    names = backend_names(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv rebuild", persistent=False)
    try:
        report = await rebuild_views(
            nc,
            backend_name=names.name,
            layout=rewrite_layout(args),
            barrier=Barrier(encryption),
            progress=progress_printer("rebuild"),
        )
    finally:
        await _close(nc)
    _say(
        f"rebuilt views from {plural(report.events, 'event')}: "
        f"{plural(report.secrets, 'secret')}, {plural(report.mappings, 'entity', 'entities')}, "
        f"secrets bucket at revision {report.secrets_revision}"
    )
    return 0


def progress_printer(label: str, unit: str = "events") -> Callable[[int, int], None] | None:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent != last[0]:
            last[0] = percent
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\r{label} [{bar:<25}] {done}/{total} {unit}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


async def cmd_audit(args: argparse.Namespace) -> int:
    from projections.audit import AccessCounts, Bound, export_audit

    counts = AccessCounts()

    names = backend_names(args)
    key = os.environ.get("ENCRYPTION_XKEY_SEED")
    encryption = seed_from_env("ENCRYPTION_XKEY_SEED") if key else None
    if encryption is None:
        sys.stderr.write(
            "secrets-nats-kv: warning: ENCRYPTION_XKEY_SEED unset: event tags are not checked\n"
        )
    window = {"since": Bound.parse(args.since), "until": Bound.parse(args.until)}
    nc = await connect(nats_options(args), name="secrets-nats-kv audit", persistent=False)
    try:
        out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: ASYNC230, SIM115
        try:
            count = await export_audit(
                nc,
                names.name,
                out,
                **window,
                follow=args.follow,
                include_access=args.access,
                encryption=encryption,
                signer=audit_signer(),
                checkpoint_every=getattr(args, "checkpoint_every", 1),
                counts=counts,
            )
        finally:
            if args.output:
                out.close()
    finally:
        await _close(nc)
    if counts.forged:
        sys.stderr.write(
            f"secrets-nats-kv: warning: {counts.forged} access-log messages not tagged by the "
            "backend were left out\n"
        )
    if args.output:
        _say(f"wrote {count} records to {args.output}")
    return 0


def audit_signer() -> SigningKey | None:
    """AUDIT_SIGNING_SEED (an account seed, SA…) signs the export's checkpoints, if set."""
    text = os.environ.get("AUDIT_SIGNING_SEED")
    if not text:
        return None
    try:
        return SigningKey.from_seed(text.strip(), Role.ACCOUNT)
    except InvalidKey as exc:
        raise ConfigError(f"AUDIT_SIGNING_SEED: {exc}") from None


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


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


async def cmd_keys(args: argparse.Namespace) -> int:
    """Fresh seeds as `export NAME=SEED  # public key X…` lines, to paste or `eval`."""
    for variable in args.variables:
        if not _VARIABLE.fullmatch(variable):
            raise ConfigError(f"keys gen: {variable!r} is not a shell variable name")
    for variable in args.variables:
        key = XKey.generate()
        _say(f"export {variable}={key.seed}  # public key {key.public_key}")
    return 0


async def cmd_backup(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app.backup import cmd_backup as run

    return await run(args)


async def cmd_restore(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app.backup import cmd_restore as run

    return await run(args)


async def cmd_status(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app.status import cmd_status as run

    return await run(args)


async def cmd_nats_permissions(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app import permissions

    names = backend_names(args)
    sys.stdout.write(permissions.render(names, permissions.roles_of(args), args.permissions_format))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "run": cmd_run,
    "dev": cmd_dev,
    "put": cmd_put,
    "get": cmd_get,
    "add-mapping": cmd_add_mapping,
    "remove-mapping": cmd_remove_mapping,
    "keys": cmd_keys,
    "list": cmd_list,
    "mappings": cmd_mappings,
    "delete": cmd_delete,
    "undelete": cmd_undelete,
    "destroy": cmd_destroy,
    "rebuild": cmd_rebuild,
    "audit": cmd_audit,
    "rotate-key": cmd_rotate_key,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "status": cmd_status,
    "import": import_command.cmd_import,
    "nats-permissions": cmd_nats_permissions,
}


async def dispatch(args: argparse.Namespace) -> int:
    command = COMMANDS.get(args.command)
    if command is None:
        raise SecretsBackendError(f"unknown command {args.command}")
    return await command(args)
