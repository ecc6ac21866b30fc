"""`verify` and `repair`: an operator's tools for the event log's chain.

`verify` reads the whole log with ENCRYPTION_XKEY_SEED and says, in one line, either how
far it verifies or where the chain breaks (exit 1). `repair` appends a tagged
`LogRepaired` that accepts the breaks on the record (what was lost stays lost: re-check
mappings and secrets afterwards), then rebuilds the KV views from the repaired log.
Backends that stopped at the break are restarted afterwards. It also removes entries not
tagged by our key (junk anyone on the bus published), recorded first by a tagged
`ForeignDropped`, so no later start reads them again; that changes no view.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

import anyio

from events.anchor import anchor_said
from events.drop import Dropped, drop_foreign
from events.log import EventLog
from events.repair import repair_log, verify_log
from projections.checkpoints import verify_export
from projections.rebuild import rebuild_views
from secrets_nats_kv import config
from secrets_nats_kv.app.arguments import backend_names, nats_options, rewrite_layout
from secrets_nats_kv.app.commands import audit_signer, seed_from_env
from secrets_nats_kv.app.terminal import progress_printer
from secrets_nats_kv.app.terminal import say as _say
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import ConfigError, InvalidKey
from secrets_nats_kv.nats.connection import connect

Adder = Callable[[argparse.ArgumentParser], None]


ADMIN_COMMANDS = (
    "put",
    "add-mapping",
    "remove-mapping",
    "list",
    "mappings",
    "delete",
    "undelete",
    "destroy",
)


def add_parsers(commands: argparse._SubParsersAction, add_nats: Adder, add_names: Adder) -> None:  # type: ignore[type-arg]
    for name in ADMIN_COMMANDS:  # the pinned transit key (see commands.pinned_transit)
        commands.choices[name].add_argument(
            "--transit-xkey",
            metavar="XKEY",
            help="the backend's transit public key (env TRANSIT_XKEY): seal to it, and "
            "refuse a server_xkey answer that differs",
        )
    verify = commands.add_parser("verify", help="check the event log's chain; name any break")
    add_nats(verify)
    add_names(verify)
    repair = commands.add_parser(
        "repair", help="accept the event log's breaks on the record, then rebuild the views"
    )
    repair.add_argument("--reason", required=True, help="why (kept in the log and the audit)")
    repair.add_argument("--max-secret-history", type=int, default=config.DEFAULT_MAX_SECRET_HISTORY)
    repair.add_argument("--replicas", type=int, default=1)
    add_nats(repair)
    add_names(repair)


def add_audit_parsers(
    audit_commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    export: argparse.ArgumentParser,
) -> None:
    """`audit export --checkpoint-every N` and `audit verify FILE --public-key A…`."""
    export.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="with AUDIT_SIGNING_SEED: a signed checkpoint after every N records (default 1)",
    )
    check = audit_commands.add_parser(
        "verify", help="check an exported audit file's signed checkpoints (offline)"
    )
    check.add_argument("file")
    check.add_argument("--public-key", required=True, help="the signer's account key (A…)")


def handler_for(args: argparse.Namespace) -> Callable[[argparse.Namespace], Awaitable[int]] | None:
    """The command of this module `args` names, if any."""
    if args.command == "audit":
        return cmd_audit_verify if args.audit_command == "verify" else None
    return COMMANDS.get(args.command)


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        data = await anyio.Path(args.file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        verdict = verify_export(data.splitlines(keepends=True), args.public_key)
    except InvalidKey as exc:
        raise ConfigError(f"--public-key: {exc}") from None
    if not verdict.ok:
        raise ConfigError(verdict.summary())
    _say(verdict.summary())
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    names = backend_names(args)
    barrier = Barrier(seed_from_env("ENCRYPTION_XKEY_SEED"))
    nc = await connect(nats_options(args), name="secrets-nats-kv verify", persistent=False)
    try:
        found = await verify_log(EventLog(nc, backend_name=names.name, barrier=barrier))
    finally:
        await nc.close()
    if found.broken is not None:
        raise found.broken
    _say(
        f"event log verified: {found.verified} entries to #{found.head}, "
        f"{found.foreign} not tagged by this key skipped"
        + (" (repair removes them)" if found.foreign else "")
    )
    return 0


async def cmd_repair(args: argparse.Namespace) -> int:
    names = backend_names(args)
    encryption = seed_from_env("ENCRYPTION_XKEY_SEED")
    signer = audit_signer()  # the repaired head's anchor: a signed checkpoint, given it
    barrier = Barrier(encryption)
    nc = await connect(nats_options(args), name="secrets-nats-kv repair", persistent=False)
    try:
        event_log = EventLog(nc, backend_name=names.name, barrier=barrier)
        appended = await repair_log(
            event_log, admin_key=encryption.public_key, reason=args.reason, signer=signer
        )
        dropped = await drop_foreign(
            event_log, admin_key=encryption.public_key, reason=args.reason, signer=signer
        )
        if appended is None:
            _say(
                _dropped_said(dropped)
                if dropped.erased
                else "event log verified: nothing to repair"
            )
            return 0
        report = await rebuild_views(
            nc,
            backend_name=names.name,
            layout=rewrite_layout(args),
            barrier=barrier,
            progress=progress_printer("rebuild"),
        )
    finally:
        await nc.close()
    _say(
        f"repaired: entry #{appended.seq} accepts the breaks; views rebuilt from "
        f"{report.events} events{anchor_said(signer.public_key if signer else '')}: "
        "restart the backends, then re-check mappings and secrets"
    )
    if dropped.erased:
        _say(_dropped_said(dropped))
    return 0


def _dropped_said(dropped: Dropped) -> str:
    where = f"entry #{dropped.record_seq}" if dropped.record_seq else "an earlier repair"
    return (
        f"dropped {dropped.erased} entries not tagged by this key from the event log "
        f"({where} records them)"
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "verify": cmd_verify,
    "repair": cmd_repair,
}
