"""`get`: read a secret straight from the KV bucket, as the original does.

No backend is asked: the value is read from `WASMCLOUD_SECRETS`, its KV tag checked and
its seal opened with ENCRYPTION_XKEY_SEED. This is the only command that prints a value.
"""

from __future__ import annotations

import argparse
import sys

import anyio
import nats.errors
import nats.js.errors

from secrets_nats_kv import config, streams
from secrets_nats_kv.app.arguments import backend_names, nats_options, secret_name
from secrets_nats_kv.app.commands import seed_from_env
from secrets_nats_kv.app.session import close
from secrets_nats_kv.app.terminal import plural, say
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.errors import ConfigError, DecryptionError, SecretNotFound
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import to_backend_error


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
    name = secret_name(args.name)
    encryption = seed_from_env("ENCRYPTION_XKEY_SEED")
    names = backend_names(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv cli", persistent=False)
    stream = streams.kv_stream(names.secrets_bucket)
    subject = streams.kv_subject(names.secrets_bucket, name)
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
            raise to_backend_error(f"read {name}", exc) from None
    finally:
        await close(nc)
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
        say(f"wrote {plural(len(value), 'byte')} of {name} version {msg.seq} to {args.output}")
    elif kind == "binary":
        if sys.stdout.isatty():
            raise ConfigError(
                f"{name} is binary ({plural(len(value), 'byte')}) and stdout is a terminal: "
                "give --output FILE or pipe the output"
            )
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    else:
        say(value.decode("utf-8", errors="replace"))
    return 0
