"""Connecting to NATS with the operator's credentials and TLS, failing in one clear line.

A long-running backend reconnects forever with backoff; a CLI command tries briefly and
reports why it could not connect (unreachable, bad credentials, bad TLS files).
"""

from __future__ import annotations

import logging
import os
import ssl

import anyio
import nats.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.errors import ConfigError, NatsUnavailable

log = logging.getLogger(__name__)


def _tls_context(options: NatsOptions) -> ssl.SSLContext | None:
    if not (options.tls_ca or options.tls_cert or options.tls_key):
        return None
    if bool(options.tls_cert) != bool(options.tls_key):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    try:
        context = ssl.create_default_context(cafile=options.tls_ca)
        if options.tls_cert and options.tls_key:
            context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc.strerror or exc}") from None
    return context


class _Watch:
    """Connection callbacks of a long-lived client; quiet once we close it ourselves."""

    def __init__(self) -> None:
        self.nc: NATS | None = None

    def _closing(self) -> bool:
        return self.nc is not None and (self.nc.is_closed or self.nc.is_draining)

    async def error(self, exc: Exception) -> None:
        if not self._closing():
            log.warning("NATS connection error", extra={"error": type(exc).__name__})

    async def disconnected(self) -> None:
        if not self._closing():
            log.warning("disconnected from NATS, reconnecting")

    async def reconnected(self) -> None:
        log.info("reconnected to NATS")


async def _silent_error(exc: Exception) -> None:
    """CLI clients report failures as exceptions; nats-py need not print them too."""


def _check_readable(options: NatsOptions) -> None:
    """Fail in one line on a credentials file we cannot read, before nats-py does worse."""
    for path, label in (
        (options.creds_file, "NATS credentials file"),
        (options.nkey_seed_file, "NATS nkey seed file"),
    ):
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"cannot read {label} {path}")


async def connect(options: NatsOptions, *, name: str, persistent: bool) -> NATS:
    """Connect; `persistent` clients (the backend) reconnect forever, others fail fast."""
    _check_readable(options)
    watch = _Watch()
    kwargs: dict[str, object] = {
        "servers": list(options.servers),
        "name": name,
        "connect_timeout": 2,
    }
    if persistent:
        kwargs.update(
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=watch.error,
            disconnected_cb=watch.disconnected,
            reconnected_cb=watch.reconnected,
        )
    else:
        kwargs.update(allow_reconnect=False, max_reconnect_attempts=1, error_cb=_silent_error)
    if options.creds_file:
        kwargs["user_credentials"] = options.creds_file
    if options.nkey_seed_file:
        kwargs["nkeys_seed"] = options.nkey_seed_file
    if options.user:
        kwargs["user"] = options.user
    if options.password:
        kwargs["password"] = options.password
    context = _tls_context(options)
    if context is not None:
        kwargs["tls"] = context
    nc = watch.nc = NATS()
    try:
        await nc.connect(**kwargs)  # type: ignore[arg-type]
    except BaseException as exc:
        # nats-py leaves the socket of a refused first connect open: close it ourselves.
        with anyio.CancelScope(shield=True):
            await nc.close()
        if isinstance(exc, nats.errors.Error):
            raise NatsUnavailable(_describe(exc, options)) from None
        if isinstance(exc, OSError | TimeoutError):
            raise NatsUnavailable(f"cannot reach NATS at {_where(options)}: {exc}") from None
        raise
    return nc


def _where(options: NatsOptions) -> str:
    return ",".join(options.servers)


def _describe(exc: BaseException, options: NatsOptions) -> str:
    text = str(exc).lower()
    if "authorization" in text or "authentication" in text or "permissions" in text:
        return f"NATS at {_where(options)} refused our credentials"
    if isinstance(exc, nats.errors.NoServersError):
        return f"cannot reach NATS at {_where(options)}"
    return f"cannot connect to NATS at {_where(options)}: {type(exc).__name__}"
