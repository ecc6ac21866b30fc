"""The `secrets-nats-kv` command line: the original's commands, flags and variables, and more.

Parsing lives here; what each command does lives in `secrets_nats_kv.app.commands`. Every
failure the project knows of ends as one line on stderr and a non-zero exit, never a
traceback (set SECRETS_NATS_KV_DEBUG=1 to see one for an unexpected failure).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from secrets_nats_kv import __version__, config
from secrets_nats_kv.errors import SecretsBackendError

PROG = "secrets-nats-kv"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too, with the same prefix as every failure.

    Scripts look for `secrets-nats-kv: error:`; a subcommand's usage error names the
    subcommand after it instead of before it.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"{PROG}: error: {where}{message}\n")
        raise SystemExit(2)


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _add_nats(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NATS connection")
    group.add_argument(
        "--nats-address",
        default=os.environ.get("NATS_ADDRESS", config.DEFAULT_NATS_ADDRESS),
        help="server address, or a comma-separated list (default %(default)s)",
    )
    group.add_argument(
        "--nats-creds-file",
        default=os.environ.get("NATS_CREDSFILE"),
        help="NATS credentials file (env NATS_CREDSFILE)",
    )
    group.add_argument("--nats-nkey-seed-file", default=os.environ.get("NATS_NKEY_SEED_FILE"))
    group.add_argument("--nats-user", default=os.environ.get("NATS_USER"))
    group.add_argument(
        "--nats-password",
        default=os.environ.get("NATS_PASSWORD"),
        help="prefer env NATS_PASSWORD over the flag",
    )
    group.add_argument("--tls-ca", default=os.environ.get("NATS_TLS_CA"))
    group.add_argument("--tls-cert", default=os.environ.get("NATS_TLS_CERT"))
    group.add_argument("--tls-key", default=os.environ.get("NATS_TLS_KEY"))


def _add_names(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend identity")
    group.add_argument("--subject-base", default=config.DEFAULT_SUBJECT_BASE)
    group.add_argument(
        "--name", dest="backend_name", default=config.DEFAULT_NAME, help="backend name"
    )
    group.add_argument("--secrets-api-version", default=config.DEFAULT_API_VERSION)
    group.add_argument("--nats-queue-base", default=config.DEFAULT_QUEUE_BASE)
    group.add_argument("-b", "--secrets-bucket", default=config.DEFAULT_SECRETS_BUCKET)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-secret-history", type=int, default=config.DEFAULT_MAX_SECRET_HISTORY)
    parser.add_argument(
        "--replicas", type=int, default=1, help="replicas of the streams and buckets it creates"
    )
    parser.add_argument(
        "--admin-xkey",
        action="append",
        default=_env_list("ADMIN_XKEYS"),
        metavar="XKEY",
        help="public xkey allowed to sign admin operations (repeatable; env ADMIN_XKEYS)",
    )
    parser.add_argument(
        "--trusted-issuer",
        action="append",
        default=_env_list("TRUSTED_ISSUERS"),
        metavar="KEY",
        help="only accept JWTs issued by these keys (repeatable; env TRUSTED_ISSUERS)",
    )
    parser.add_argument(
        "--insecure-unauthenticated-admin",
        action="store_true",
        help="accept the original's unauthenticated put_secret and mapping requests",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not record gets")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="backend processes on this machine, sharing the load (default 1)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A wasmCloud secrets backend on NATS JetStream.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the backend (connects to an existing NATS)")
    _add_nats(run)
    _add_names(run)
    _add_run_options(run)

    dev = commands.add_parser(
        "dev", help="development: start the bundled nats-server and a backend on it"
    )
    dev.add_argument("--data-dir", default=".secrets-nats-kv")
    dev.add_argument("--nats-address", default=config.DEFAULT_NATS_ADDRESS)
    dev.add_argument("--log-format", choices=("text", "json"), default="text")
    dev.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")

    put = commands.add_parser("put", help="store a new version of a secret")
    put.add_argument("name")
    value = put.add_mutually_exclusive_group()
    value.add_argument("--string", help="the value (prefer env SECRET_STRING_VALUE)")
    value.add_argument("--binary", metavar="FILE", help="read a binary value from FILE")
    _add_nats(put)
    _add_names(put)

    get = commands.add_parser("get", help="read a secret straight from the KV bucket")
    get.add_argument("name")
    get.add_argument("--secret-version", type=int, default=None)
    get.add_argument("--kind", choices=("string", "binary"), default=None)
    get.add_argument("--output", metavar="FILE", help="write the value to FILE")
    _add_nats(get)
    _add_names(get)

    for command, verb in (("add-mapping", "allow"), ("remove-mapping", "disallow")):
        mapping = commands.add_parser(
            command, help=f"{verb} a component or provider to read secrets"
        )
        mapping.add_argument("entity", metavar="PUBKEY")
        mapping.add_argument("--secret", action="append", required=True, metavar="NAME")
        _add_nats(mapping)
        _add_names(mapping)

    listing = commands.add_parser("list", help="list secrets with their latest version")
    _add_nats(listing)
    _add_names(listing)

    mappings = commands.add_parser("mappings", help="show which entities may read what")
    mappings.add_argument("entity", metavar="PUBKEY", nargs="?")
    _add_nats(mappings)
    _add_names(mappings)

    for command, text in (
        ("delete", "soft-delete a secret (history kept; undelete restores it)"),
        ("undelete", "restore a deleted secret"),
    ):
        change = commands.add_parser(command, help=text)
        change.add_argument("name")
        _add_nats(change)
        _add_names(change)

    destroy = commands.add_parser(
        "destroy", help="crypto-shred versions of a secret: erased from the log and the KV"
    )
    destroy.add_argument("name")
    which = destroy.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, dest="secret_version")
    which.add_argument("--all", action="store_true")
    _add_nats(destroy)
    _add_names(destroy)

    rebuild = commands.add_parser("rebuild", help="drop the KV views and refold them from the log")
    _add_nats(rebuild)
    _add_names(rebuild)
    rebuild.add_argument(
        "--max-secret-history", type=int, default=config.DEFAULT_MAX_SECRET_HISTORY
    )
    rebuild.add_argument("--replicas", type=int, default=1)

    rotate = commands.add_parser(
        "rotate-key",
        help="re-encrypt every value under NEW_ENCRYPTION_XKEY_SEED (offline: stop backends)",
    )
    rotate.add_argument("--force", action="store_true", help="run even if a backend answers")
    rotate.add_argument("--dry-run", action="store_true", help="report what it would do")
    rotate.add_argument("--max-secret-history", type=int, default=config.DEFAULT_MAX_SECRET_HISTORY)
    rotate.add_argument("--replicas", type=int, default=1)
    _add_nats(rotate)
    _add_names(rotate)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    export = audit_commands.add_parser("export", help="export the event history as JSON Lines")
    export.add_argument("--output", metavar="FILE")
    export.add_argument("--since", metavar="SEQ|ISO-TIME")
    export.add_argument("--until", metavar="SEQ|ISO-TIME")
    export.add_argument("--follow", action="store_true", help="keep streaming new events")
    export.add_argument("--access", action="store_true", help="include the get access log")
    _add_nats(export)
    _add_names(export)
    from secrets_nats_kv.app import integrity_commands

    integrity_commands.add_audit_parsers(audit_commands, export)

    from secrets_nats_kv.app import integrity_commands

    integrity_commands.add_parsers(commands, _add_nats, _add_names)

    keys = commands.add_parser("keys", help="key utilities")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    key_commands.add_parser("gen", help="print a fresh curve (xkey) seed and its public key")
    return parser


def _project_error(group: BaseExceptionGroup[BaseException]) -> SecretsBackendError | None:
    """The first of our own errors inside a task group's exception group, if any."""
    for exc in group.exceptions:
        if isinstance(exc, SecretsBackendError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _project_error(exc)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from secrets_nats_kv.app import commands, integrity_commands

    try:
        handler = integrity_commands.handler_for(args) or commands.dispatch
        return anyio.run(handler, args)
    except SecretsBackendError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except BaseExceptionGroup as group:  # a failure inside a task group (run, dev)
        known = _project_error(group)
        if known is None:
            raise
        sys.stderr.write(f"{PROG}: error: {known}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("SECRETS_NATS_KV_DEBUG"):
            raise
        sys.stderr.write(f"{PROG}: internal error: {type(exc).__name__}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
