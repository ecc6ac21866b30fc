"""`secrets-nats-kv import`: take over a deployment of the original Rust secrets-nats-kv.

The same connection, `--name` and `--secrets-bucket` flags and environment as `run`.
It needs ENCRYPTION_XKEY_SEED (every value must open with it, and it tags the log) and
an admin key (ADMIN_XKEY_SEED, or TRANSIT_XKEY_SEED), whose public key the import's
record names. The work itself is `actors.takeover.importer`.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from secrets_nats_kv import config

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def add_parser(commands: argparse._SubParsersAction[_P]) -> _P:
    """Register `import`; `parsers.operator` adds the connection and name flags to it."""
    parser = commands.add_parser(
        "import",
        help="take over the buckets of the original secrets-nats-kv (stop its instances first)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what it would import; change nothing"
    )
    parser.add_argument("--max-secret-history", type=int, default=config.DEFAULT_MAX_SECRET_HISTORY)
    parser.add_argument("--replicas", type=int, default=1)
    return parser


async def cmd_import(args: argparse.Namespace) -> int:
    from actors.takeover.importer import import_original
    from secrets_nats_kv.app.arguments import backend_names, nats_options, rewrite_layout
    from secrets_nats_kv.app.commands import seed_from_env
    from secrets_nats_kv.app.terminal import progress_printer, say
    from secrets_nats_kv.nats.connection import connect

    encryption = seed_from_env("ENCRYPTION_XKEY_SEED")
    admin = seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED")
    names = backend_names(args)
    layout = rewrite_layout(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv import", persistent=False)
    try:
        report = await import_original(
            nc,
            backend_name=names.name,
            layout=layout,
            encryption=encryption,
            admin_key=admin.public_key,
            dry_run=args.dry_run,
            progress=progress_printer("import"),
        )
    finally:
        await nc.close()
    say(report.summary())
    return 0
