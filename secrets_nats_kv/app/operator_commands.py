"""The operator's commands that need no backend: `rebuild` (refold the KV views from the
log) and `audit export` read the streams themselves; `keys gen` and `nats-permissions`
print what an operator sets up with (fresh seeds, each role's allow-lists).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from secrets_nats_kv.app.arguments import backend_names, nats_options, rewrite_layout
from secrets_nats_kv.app.commands import audit_signer, seed_from_env
from secrets_nats_kv.app.session import close
from secrets_nats_kv.app.terminal import plural, progress_printer, say
from secrets_nats_kv.errors import ConfigError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import XKey


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
        await close(nc)
    say(
        f"rebuilt views from {plural(report.events, 'event')}: "
        f"{plural(report.secrets, 'secret')}, {plural(report.mappings, 'entity', 'entities')}, "
        f"secrets bucket at revision {report.secrets_revision}"
    )
    return 0


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
        await close(nc)
    if counts.forged:
        sys.stderr.write(
            f"secrets-nats-kv: warning: {counts.forged} access-log messages not tagged by the "
            "backend were left out\n"
        )
    if args.output:
        say(f"wrote {count} records to {args.output}")
    return 0


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


async def cmd_keys(args: argparse.Namespace) -> int:
    """Fresh seeds as `export NAME=SEED  # public key X…` lines, to paste or `eval`."""
    for variable in args.variables:
        if not _VARIABLE.fullmatch(variable):
            raise ConfigError(f"keys gen: {variable!r} is not a shell variable name")
    for variable in args.variables:
        key = XKey.generate()
        say(f"export {variable}={key.seed}  # public key {key.public_key}")
    return 0


async def cmd_nats_permissions(args: argparse.Namespace) -> int:
    from secrets_nats_kv.app import permissions

    names = backend_names(args)
    sys.stdout.write(permissions.render(names, permissions.roles_of(args), args.permissions_format))
    return 0
