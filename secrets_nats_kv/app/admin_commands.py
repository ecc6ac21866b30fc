"""The commands a backend answers: put, add-mapping, remove-mapping, list, mappings,
delete, undelete and destroy.

Each seals one admin request to the backend's transit key (pinned when the operator
gave it) and prints one line. The session turns the wire's bare refusals into errors
that say which key was refused and why, and a silent bus into the command to start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator

from secrets_nats_kv import config
from secrets_nats_kv.app.arguments import backend_names, nats_options, secret_name
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.commands import seed_from_env
from secrets_nats_kv.app.session import close, why_silent
from secrets_nats_kv.app.terminal import plural, say
from secrets_nats_kv.errors import (
    BackendNotAnswering,
    ConfigError,
    InvalidKey,
    InvalidRequest,
    SecretNotFound,
    Unauthorized,
)
from secrets_nats_kv.naming import validate_entity
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import XKey


def _refuse_bucket(args: argparse.Namespace) -> None:
    """`-b` on a command the backend answers: refused, never silently ignored."""
    if getattr(args, "refused_bucket", None) is not None:
        raise ConfigError(
            f"{args.command} -b/--secrets-bucket: the backend answers this with its own "
            "bucket (set it with `run -b`); drop -b here, or pick the backend with -n/--name"
        )


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
        reason = await why_silent(nc, args)  # the original's buckets, not yet imported?
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
        await close(nc)


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
    name = secret_name(args.name)
    value = _put_value(args)
    if args.secret_version is not None:
        sys.stderr.write(
            "secrets-nats-kv: warning: put --secret-version is ignored: the backend assigns "
            "versions (the original ignored it too)\n"
        )
    async with _admin_session(args) as client:
        revision = await client.put_secret(name, value)
    say(f"stored {name} as version {revision}")
    return 0


async def _mapping(args: argparse.Namespace, add: bool) -> int:
    try:
        entity = validate_entity(args.entity)
    except InvalidKey as exc:
        raise ConfigError(f"PUBKEY: {exc}") from None
    names = [secret_name(name) for name in args.secret]
    async with _admin_session(args) as client:
        if add:
            await client.add_mapping(entity, names)
        else:
            await client.remove_mapping(entity, names)
    verb = "may now read" if add else "may no longer read"
    say(f"{entity} {verb} {', '.join(names)}")
    return 0


async def cmd_add_mapping(args: argparse.Namespace) -> int:
    return await _mapping(args, add=True)


async def cmd_remove_mapping(args: argparse.Namespace) -> int:
    return await _mapping(args, add=False)


async def cmd_list(args: argparse.Namespace) -> int:
    async with _admin_session(args) as client:
        listing = await client.list_secrets()
    if not listing:
        say("no secrets")
    for item in listing:
        state = " (deleted)" if item.deleted else ""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.updated_at))
        versions = plural(item.versions, "version")
        say(f"{item.name}\tversion {item.version}\t{versions}\t{when}{state}")
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
        say("no mappings")
    for key, names in mappings.items():
        if names:
            say(f"{key}\t{', '.join(names)}")
    return 0


async def cmd_delete(args: argparse.Namespace) -> int:
    name = secret_name(args.name)
    async with _admin_session(args) as client:
        try:
            revision = await client.delete(name)
        except SecretNotFound:
            raise SecretNotFound(name) from None
    say(f"deleted {name} (revision {revision}); undelete restores it")
    return 0


async def cmd_undelete(args: argparse.Namespace) -> int:
    name = secret_name(args.name)
    async with _admin_session(args) as client:
        try:
            revision = await client.undelete(name)
        except SecretNotFound:
            raise SecretNotFound(name) from None
        except InvalidRequest:  # the only request undelete can get wrong: a live secret
            raise ConfigError(f"secret {name!r} is not deleted: nothing to undelete") from None
    say(f"restored {name} as version {revision}")
    return 0


async def cmd_destroy(args: argparse.Namespace) -> int:
    name = secret_name(args.name)
    async with _admin_session(args) as client:
        try:
            destroyed = await client.destroy(name, version=args.secret_version, all=args.all)
        except SecretNotFound:
            raise SecretNotFound(name, args.secret_version) from None
    versions = ", ".join(str(v) for v in destroyed) or "none"
    word = "revision" if len(destroyed) == 1 else "revisions"
    say(f"destroyed {name} {word} {versions}: their bytes are erased")
    return 0
