"""The parsers of the operator's commands: rebuild, rotate-key, audit, verify, repair,
backup, restore, status, import, nats-permissions and keys.
"""

from __future__ import annotations

from typing import Any

from secrets_nats_kv.app import import_command, permissions
from secrets_nats_kv.app.parsers.options import (
    Parser,
    add_command,
    add_names,
    add_nats,
    add_rewrite_options,
    add_seed,
)


def add_operator_parsers(commands: Any) -> None:
    rebuild = add_command(
        commands, "rebuild", "drop the KV views and refold them from the log", seed="encryption"
    )
    add_nats(rebuild)
    add_names(rebuild)
    add_rewrite_options(rebuild)

    add_rotate_key_parser(commands)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, parser_class=Parser)
    export = audit_commands.add_parser("export", help="export the event history as JSON Lines")
    add_seed(export, "encryption_xkey_seed", "-e")
    export.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    export.add_argument("--since", metavar="SEQ|ISO-TIME", help="first event to export")
    export.add_argument("--until", metavar="SEQ|ISO-TIME", help="last event to export")
    export.add_argument("--follow", action="store_true", help="keep streaming new events")
    export.add_argument("--access", action="store_true", help="include the get access log")
    add_nats(export)
    add_names(export)
    from secrets_nats_kv.app import integrity_commands

    integrity_commands.add_audit_parsers(audit_commands, export)
    integrity_commands.add_parsers(commands, add_nats, add_names)

    backup = commands.add_parser(
        "backup", help="copy the event and access logs to a folder (never a seed)"
    )
    backup.add_argument("--output", metavar="DIR", required=True, help="a new or empty folder")
    add_nats(backup)
    add_names(backup)
    restore = commands.add_parser(
        "restore", help="restore a backup into a NATS that holds nothing of this backend"
    )
    restore.add_argument("source", metavar="DIR", help="a folder written by `backup`")
    restore.add_argument(
        "--replicas", type=int, default=None, help="replicas of the streams (default: as backed up)"
    )
    add_nats(restore)
    add_names(restore)

    status = commands.add_parser(
        "status", help="health check: exit 0 only if a caught-up, healthy backend answers"
    )
    status.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for instances to answer"
    )
    add_nats(status)
    add_names(status)

    importing = import_command.add_parser(commands)
    add_nats(importing)
    add_names(importing)

    add_names(permissions.add_parser(commands))

    keys = commands.add_parser("keys", help="key utilities")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    gen = key_commands.add_parser(
        "gen", help="print fresh curve (xkey) seeds as `export NAME=SEED` lines"
    )
    gen.add_argument(
        "variables",
        nargs="*",
        metavar="NAME",
        default=["TRANSIT_XKEY_SEED", "ENCRYPTION_XKEY_SEED"],
        help="variable names, one fresh seed each",
    )


def add_rotate_key_parser(commands: Any) -> None:
    rotate = add_command(
        commands,
        "rotate-key",
        "re-encrypt every value under NEW_ENCRYPTION_XKEY_SEED (offline: stop backends)",
        seed="encryption",
    )
    rotate.add_argument("--force", action="store_true", help="run even if a backend answers")
    rotate.add_argument("--dry-run", action="store_true", help="report what it would do")
    rotate.add_argument(
        "--online",
        action="store_true",
        help="with backends running that hold the new key as next (a brief write fence)",
    )
    rotate.add_argument(
        "--abort",
        action="store_true",
        help="give up an online rotation not yet committed: lift its write fence",
    )
    add_rewrite_options(rotate)
    add_nats(rotate)
    add_names(rotate)
