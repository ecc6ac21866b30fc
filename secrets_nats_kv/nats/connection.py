"""Connecting to NATS with the operator's credentials and TLS, failing in one clear line.

A long-running backend reconnects forever with backoff; a CLI command tries briefly and
reports why it could not connect (unreachable, bad credentials, bad TLS files). Refused
credentials and a failed TLS handshake are not worth retrying on the first connect: the
backend stops with the reason instead of retrying silently forever. Server addresses are
shown without any `user:password@` part.
"""

from __future__ import annotations

import logging
import os
import ssl
from urllib.parse import urlsplit

import anyio
import nats.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.errors import ConfigError, NatsUnavailable
from secrets_nats_kv.nats.jetstream import to_backend_error
from secrets_nats_kv.nats.refusals import refusals

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 2.0
COMMAND_NAME_PREFIX = "secrets-nats-kv "  # how the CLI's commands name their connections


class _QuietSslEof(logging.Filter):
    """Drop asyncio's notice that nats-py's protocol asks to keep a TLS stream half-open.

    nats-py returns True from `eof_received` on every connection; over TLS asyncio logs
    that this "has no effect" each time a connection closes: noise on a CLI's stderr,
    with nothing to act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietSslEof())


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

    def __init__(self, command: bool = False) -> None:
        self.nc: NATS | None = None
        self.command = command  # a CLI command's connection (named `secrets-nats-kv …`)

    def _closing(self) -> bool:
        return self.nc is not None and (self.nc.is_closed or self.nc.is_draining)

    async def error(self, exc: Exception) -> None:
        if self.nc is not None and refusals(self.nc).note(exc):
            log.warning("NATS refused a permission", extra={"error": str(exc)})
        elif not self._closing():
            log.warning("NATS connection error", extra={"error": _kind(exc)})

    async def quiet_error(self, exc: Exception) -> None:
        """CLI clients report failures as exceptions; nats-py need not print them too.
        A permission violation is recorded: the request it dooms fails with it (and, on
        a CLI command's own connection, any timeout in the process: `refusals`)."""
        if self.nc is not None:
            refusals(self.nc).note(exc, short_lived=self.command)

    async def disconnected(self) -> None:
        if not self._closing():
            log.warning("disconnected from NATS, reconnecting")

    async def reconnected(self) -> None:
        log.info("reconnected to NATS")


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
    watch = _Watch(command=not persistent and name.startswith(COMMAND_NAME_PREFIX))
    refused: list[BaseException] = []
    give_up = anyio.Event()

    async def first_connect_error(exc: Exception) -> None:
        """nats-py retries a refused first connect forever: note it, so we stop instead."""
        if not give_up.is_set() and _permanent(exc):
            refused.append(exc)
            give_up.set()
        await watch.error(exc)

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
            error_cb=first_connect_error,
            disconnected_cb=watch.disconnected,
            reconnected_cb=watch.reconnected,
        )
    else:
        kwargs.update(allow_reconnect=False, max_reconnect_attempts=1, error_cb=watch.quiet_error)
    if options.inbox_prefix:
        kwargs["inbox_prefix"] = options.inbox_prefix
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
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def stop_on_refusal() -> None:
                await give_up.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_on_refusal)
            try:
                await nc.connect(**kwargs)  # type: ignore[arg-type]
            except Exception as exc:
                failure = exc
            give_up.set()  # connected (or failed): later refusals are reconnects, retried
            tg.cancel_scope.cancel()
    finally:
        if failure is None and refused and not nc.is_connected:
            failure = refused[0]
        if failure is not None or not nc.is_connected:
            # nats-py leaves the socket of a refused first connect open: close it ourselves.
            # Bounded: after a failed TLS upgrade its close() waits forever on a stream
            # whose transport asyncio already closed (nothing is left open by giving up).
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await nc.close()
    if failure is None:
        return nc
    if isinstance(failure, ssl.SSLError):
        raise NatsUnavailable(_describe_tls(failure, options)) from None
    if isinstance(failure, nats.errors.Error):
        raise NatsUnavailable(_describe(failure, options)) from None
    if isinstance(failure, OSError | TimeoutError):
        raise NatsUnavailable(f"cannot reach NATS at {_where(options)}: {failure}") from None
    raise failure


def _permanent(exc: BaseException) -> bool:
    """A first-connect failure that retrying will not cure: credentials or TLS.

    A TLS stream cut short (EOF) is a server going away mid-handshake, not a verdict.
    """
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False
    if isinstance(exc, ssl.SSLError):
        return True
    return isinstance(exc, nats.errors.Error) and _refused_credentials(exc)


def _refused_credentials(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text or "permissions" in text


def _kind(exc: BaseException) -> str:
    """What went wrong, for a log line: never the server's full text (it may echo a user)."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {_tls_reason(exc)}"
    if isinstance(exc, nats.errors.Error) and _refused_credentials(exc):
        return "credentials refused"
    return type(exc).__name__


def _redact(url: str) -> str:
    """A server URL without its `user:password@` part."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


def _where(options: NatsOptions) -> str:
    return ",".join(_redact(url) for url in options.servers)


def _tls_reason(exc: ssl.SSLError) -> str:
    verify = getattr(exc, "verify_message", None)
    reason = verify or exc.reason or type(exc).__name__
    return str(reason).replace("_", " ").lower() if not verify else str(verify)


def _describe_tls(exc: ssl.SSLError, options: NatsOptions) -> str:
    return f"TLS handshake with NATS at {_where(options)} failed: {_tls_reason(exc)}"


def _describe(exc: BaseException, options: NatsOptions) -> str:
    if _refused_credentials(exc):
        return f"NATS at {_where(options)} refused our credentials"
    if isinstance(exc, nats.errors.NoServersError):
        return f"cannot reach NATS at {_where(options)}"
    return f"cannot connect to NATS at {_where(options)}: {type(exc).__name__}"


ROUND_TRIP_TIMEOUT = 10.0


async def round_trip(nc: NATS) -> None:
    """Return once the server has processed everything `nc` sent before this call.

    `nc.flush()` is no proof of that: nats-py writes its PING ahead of commands still in
    its buffer. A message to ourselves goes through the same buffer, after them, and the
    server handles a connection's commands in order, so its arrival is the proof (that a
    SUB is registered, that publishes have landed).
    """
    probe = nc.new_inbox()
    try:
        sub = await nc.subscribe(probe, max_msgs=1)
        await nc.publish(probe, b"")
        await sub.next_msg(timeout=ROUND_TRIP_TIMEOUT)
    except nats.errors.Error as exc:
        raise to_backend_error("round trip to the server", exc) from None
