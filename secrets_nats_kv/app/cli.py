"""The `secrets-nats-kv` command line: the original's commands, flags and variables, and more.

Parsing lives here; what each command does lives in `secrets_nats_kv.app.commands`. Every
failure the project knows of ends as one line on stderr and a non-zero exit, never a
traceback (set SECRETS_NATS_KV_DEBUG=1 to see one for an unexpected failure).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from secrets_nats_kv import __version__, config, limits
from secrets_nats_kv.app import import_command, permissions
from secrets_nats_kv.errors import SecretsBackendError

PROG = "secrets-nats-kv"


# Seeds may come as flags (the original's `-e`/`-t`); the environment is the better place.
SEED_FLAGS = {
    "encryption_xkey_seed": "ENCRYPTION_XKEY_SEED",
    "transit_xkey_seed": "TRANSIT_XKEY_SEED",
}
SEED_FLAG_WARNING = (
    f"{PROG}: warning: a seed given as a flag is visible to every user of this machine "
    "in the process list; prefer the environment variable"
)
# Options whose value is never shown as a default in --help (it may come from the environment).
_UNSHOWN_DEFAULTS = frozenset({"nats_password", "string", "binary", *SEED_FLAGS, "help", "version"})
MAX_VERSION = 2**64 - 1


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too, with the same prefix as every failure.

    Scripts look for `secrets-nats-kv: error:`; a subcommand's usage error names the
    subcommand after it instead of before it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"{PROG}: error: {where}{message}\n")
        raise SystemExit(2)


class _DefaultsShown(argparse.HelpFormatter):
    """--help shows each option's default, except values that may be secret."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = (
            action.option_strings
            and action.dest not in _UNSHOWN_DEFAULTS
            and default not in (None, False, [], argparse.SUPPRESS)
            and "%(default)" not in text
        )
        return f"{text} (default: %(default)s)".strip() if shown else text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._get_help_string(action):
            action.help = " "  # argparse prints help (and so the default) only if there is some
        return super()._format_action(action)


def version_number(text: str) -> int:
    """A secret version: a revision, 1 to 2^64-1 (JetStream's sequence range)."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()) or not 1 <= int(stripped) <= MAX_VERSION:
        raise argparse.ArgumentTypeError(
            f"a version is a whole number from 1 to {MAX_VERSION}, got {text!r}"
        )
    return int(stripped)


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _add_nats(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NATS connection")
    group.add_argument(
        "--nats-address",
        default=os.environ.get("NATS_ADDRESS", config.DEFAULT_NATS_ADDRESS),
        help="server address, or a comma-separated list (env NATS_ADDRESS)",
    )
    group.add_argument(
        "--nats-creds-file",
        default=os.environ.get("NATS_CREDSFILE"),
        help="NATS credentials file (env NATS_CREDSFILE)",
    )
    group.add_argument(
        "--nats-nkey-seed-file",
        default=os.environ.get("NATS_NKEY_SEED_FILE"),
        help="NATS nkey seed file (env NATS_NKEY_SEED_FILE)",
    )
    group.add_argument(
        "--nats-user", default=os.environ.get("NATS_USER"), help="NATS user (env NATS_USER)"
    )
    group.add_argument(
        "--nats-password",
        default=os.environ.get("NATS_PASSWORD"),
        help="prefer env NATS_PASSWORD over the flag",
    )
    group.add_argument("--tls-ca", default=os.environ.get("NATS_TLS_CA"), help="env NATS_TLS_CA")
    group.add_argument(
        "--tls-cert", default=os.environ.get("NATS_TLS_CERT"), help="env NATS_TLS_CERT"
    )
    group.add_argument("--tls-key", default=os.environ.get("NATS_TLS_KEY"), help="env NATS_TLS_KEY")


def _add_names(parser: argparse.ArgumentParser, *, bucket: bool = True) -> None:
    """The backend's names; `bucket=False` for commands the backend answers itself.

    Those commands still accept `-b` (a script may pass it) but refuse it: the bucket is
    the backend's own setting (`run -b`), and silently ignoring it would mislead.
    """
    group = parser.add_argument_group("backend identity")
    group.add_argument(
        "-s", "--subject-base", default=config.DEFAULT_SUBJECT_BASE, help="subject prefix"
    )
    group.add_argument(
        "-n",
        "--name",
        dest="backend_name",
        metavar="NAME",
        default=config.DEFAULT_NAME,
        help="backend name",
    )
    group.add_argument(
        "--secrets-api-version", default=config.DEFAULT_API_VERSION, help="protocol version"
    )
    group.add_argument(
        "--nats-queue-base", default=config.DEFAULT_QUEUE_BASE, help="queue group prefix"
    )
    if bucket:
        group.add_argument(
            "-b", "--secrets-bucket", default=config.DEFAULT_SECRETS_BUCKET, help="KV bucket"
        )
    else:
        group.add_argument(
            "-b",
            "--secrets-bucket",
            dest="refused_bucket",
            metavar="BUCKET",
            default=None,
            help="refused: the backend uses its own bucket (set it with `run -b`)",
        )


def _add_seed(parser: argparse.ArgumentParser, dest: str, short: str) -> None:
    env = SEED_FLAGS[dest]
    parser.add_argument(
        short,
        "--" + dest.replace("_", "-"),
        dest=dest,
        metavar="SEED",
        default=None,
        help=f"prefer env {env}: a flag is visible in the process list",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-secret-history",
        type=int,
        default=config.DEFAULT_MAX_SECRET_HISTORY,
        help="KV history kept per secret",
    )
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
    _add_next_encryption(parser)
    parser.add_argument(
        "--previous-transit-xkey-seeds-file",
        metavar="FILE",
        help="previous transit seeds (one per line), still accepted for gets while hosts "
        "keep the old key cached (env PREVIOUS_TRANSIT_XKEY_SEEDS, comma-separated)",
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
        "--access-log-max-bytes",
        type=int,
        default=limits.ACCESS_LOG_MAX_BYTES,
        help="the access stream keeps at most this many bytes (default 256 MiB)",
    )
    parser.add_argument(
        "--access-log-max-age-days",
        type=int,
        default=limits.ACCESS_LOG_MAX_AGE_DAYS,
        help="the access stream keeps records this long (default %(default)s days)",
    )
    parser.add_argument("--workers", type=int, default=1, help="backend processes on this machine")
    _add_logging(parser)


def _add_next_encryption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--next-encryption-xkey-seed-file",
        metavar="FILE",
        help="the key an online rotate-key moves to, held beside the current one "
        "(env NEXT_ENCRYPTION_XKEY_SEED)",
    )


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="lowest level logged",
    )


def _add_rewrite_options(parser: argparse.ArgumentParser) -> None:
    """rebuild and rotate-key recreate the KV buckets: with the run's settings."""
    parser.add_argument(
        "--max-secret-history",
        type=int,
        default=config.DEFAULT_MAX_SECRET_HISTORY,
        help="KV history kept per secret",
    )
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the buckets")


def _client(commands: Any, name: str, text: str, *, seed: str | None = None) -> Any:
    """A client command's parser with the NATS and naming options."""
    parser = commands.add_parser(name, help=text, description=text)
    if seed == "transit":
        _add_seed(parser, "transit_xkey_seed", "-t")
    elif seed == "encryption":
        _add_seed(parser, "encryption_xkey_seed", "-e")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A wasmCloud secrets backend on NATS JetStream.")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    run = commands.add_parser("run", help="run the backend (connects to an existing NATS)")
    _add_seed(run, "encryption_xkey_seed", "-e")
    _add_seed(run, "transit_xkey_seed", "-t")
    _add_nats(run)
    _add_names(run)
    _add_run_options(run)

    dev = commands.add_parser(
        "dev", help="development: start the bundled nats-server and a backend on it"
    )
    dev.add_argument("--data-dir", default=".secrets-nats-kv", help="where seeds and data live")
    dev.add_argument(
        "--nats-address", default=config.DEFAULT_NATS_ADDRESS, help="where nats-server listens"
    )
    _add_next_encryption(dev)
    _add_logging(dev)
    dev_commands = dev.add_subparsers(dest="dev_command", parser_class=_Parser, metavar="")
    dev_rotate = dev_commands.add_parser(
        "rotate-key",
        help="re-encrypt the dev store under a fresh encryption key (stop `dev` first)",
    )
    # Also after the subcommand; SUPPRESS keeps dev's own value when not repeated here.
    dev_rotate.add_argument("--data-dir", default=argparse.SUPPRESS, help="as for dev")
    dev_rotate.add_argument("--nats-address", default=argparse.SUPPRESS, help="as for dev")

    put = _client(commands, "put", "store a new version of a secret", seed="transit")
    put.add_argument("name")
    value = put.add_mutually_exclusive_group()
    value.add_argument("--string", help="the value (prefer env SECRET_STRING_VALUE)")
    value.add_argument(
        "--binary", metavar="FILE", help="read a binary value from FILE (env SECRET_BINARY_FILE)"
    )
    put.add_argument(
        "--secret-version",
        metavar="VERSION",
        default=None,
        help="accepted for the original's scripts and ignored: the backend assigns versions",
    )
    _add_nats(put)
    _add_names(put, bucket=False)

    get = _client(commands, "get", "read a secret straight from the KV bucket", seed="encryption")
    get.add_argument("name")
    get.add_argument("--secret-version", type=version_number, default=None, metavar="VERSION")
    get.add_argument(
        "--kind",
        choices=("string", "binary"),
        default=None,
        help="fail unless the secret was stored as this kind (default: whichever it is)",
    )
    get.add_argument("--output", metavar="FILE", help="write the value to FILE")
    _add_nats(get)
    _add_names(get)

    for command, verb in (("add-mapping", "allow"), ("remove-mapping", "disallow")):
        mapping = _client(
            commands, command, f"{verb} a component or provider to read secrets", seed="transit"
        )
        mapping.add_argument("entity", metavar="PUBKEY")
        mapping.add_argument("--secret", action="append", required=True, metavar="NAME")
        _add_nats(mapping)
        _add_names(mapping, bucket=False)

    listing = _client(commands, "list", "list secrets with their latest version", seed="transit")
    _add_nats(listing)
    _add_names(listing, bucket=False)

    mappings = _client(commands, "mappings", "show which entities may read what", seed="transit")
    mappings.add_argument("entity", metavar="PUBKEY", nargs="?")
    _add_nats(mappings)
    _add_names(mappings, bucket=False)

    for command, text in (
        ("delete", "soft-delete a secret (history kept; undelete restores it)"),
        ("undelete", "restore a deleted secret"),
    ):
        change = _client(commands, command, text, seed="transit")
        change.add_argument("name")
        _add_nats(change)
        _add_names(change, bucket=False)

    destroy = _client(
        commands,
        "destroy",
        "crypto-shred versions of a secret: erased from the log and the KV",
        seed="transit",
    )
    destroy.add_argument("name")
    which = destroy.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=version_number, dest="secret_version")
    which.add_argument("--all", action="store_true")
    _add_nats(destroy)
    _add_names(destroy, bucket=False)

    rebuild = _client(
        commands, "rebuild", "drop the KV views and refold them from the log", seed="encryption"
    )
    _add_nats(rebuild)
    _add_names(rebuild)
    _add_rewrite_options(rebuild)

    rotate = _client(
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
    _add_rewrite_options(rotate)
    _add_nats(rotate)
    _add_names(rotate)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    export = audit_commands.add_parser("export", help="export the event history as JSON Lines")
    _add_seed(export, "encryption_xkey_seed", "-e")
    export.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    export.add_argument("--since", metavar="SEQ|ISO-TIME", help="first event to export")
    export.add_argument("--until", metavar="SEQ|ISO-TIME", help="last event to export")
    export.add_argument("--follow", action="store_true", help="keep streaming new events")
    export.add_argument("--access", action="store_true", help="include the get access log")
    _add_nats(export)
    _add_names(export)
    from secrets_nats_kv.app import integrity_commands

    integrity_commands.add_audit_parsers(audit_commands, export)

    from secrets_nats_kv.app import integrity_commands

    integrity_commands.add_parsers(commands, _add_nats, _add_names)

    backup = commands.add_parser(
        "backup", help="copy the event and access logs to a folder (never a seed)"
    )
    backup.add_argument("--output", metavar="DIR", required=True, help="a new or empty folder")
    _add_nats(backup)
    _add_names(backup)
    restore = commands.add_parser(
        "restore", help="restore a backup into a NATS that holds nothing of this backend"
    )
    restore.add_argument("source", metavar="DIR", help="a folder written by `backup`")
    restore.add_argument(
        "--replicas", type=int, default=None, help="replicas of the streams (default: as backed up)"
    )
    _add_nats(restore)
    _add_names(restore)

    status = commands.add_parser(
        "status", help="health check: exit 0 only if a caught-up, healthy backend answers"
    )
    status.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for instances to answer"
    )
    _add_nats(status)
    _add_names(status)

    importing = import_command.add_parser(commands)
    _add_nats(importing)
    _add_names(importing)

    _add_names(permissions.add_parser(commands))

    keys = commands.add_parser("keys", help="key utilities")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
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

    helper = commands.add_parser("help", help="show the help of a command")
    helper.add_argument("topic", nargs="*", metavar="COMMAND")
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


def _help(parser: argparse.ArgumentParser, topic: list[str]) -> int:
    """`help [COMMAND …]`, as clap gives the original: the named command's --help."""
    target = parser
    for word in topic:
        choices: dict[str, argparse.ArgumentParser] = {}
        for action in target._actions:
            if isinstance(action, argparse._SubParsersAction):
                choices = action.choices
        if word not in choices:
            target.error(f"no command {word!r}; `{PROG} help` lists them")
        target = choices[word]
    target.print_help()
    return 0


def _seeds_from_flags(args: argparse.Namespace) -> None:
    """A seed flag becomes its environment variable, so workers inherit it off the argv."""
    given = [dest for dest in SEED_FLAGS if getattr(args, dest, None)]
    if not given:
        return
    sys.stderr.write(SEED_FLAG_WARNING + "\n")
    for dest in given:
        os.environ[SEED_FLAGS[dest]] = getattr(args, dest)
    args.seed_flags = given


class _EarlySignal(BaseException):
    """SIGTERM before the command's own receiver is installed (while starting up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _early_signal(signum: int, _frame: object) -> None:
    raise _EarlySignal(signum)


def main(argv: Sequence[str] | None = None) -> int:
    # Until `interrupts` installs its receiver, SIGTERM would kill us silently.
    previous = signal.signal(signal.SIGTERM, _early_signal)
    try:
        return _main(argv)
    except (_EarlySignal, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, _EarlySignal) else signal.SIGINT
        sys.stderr.write(f"{PROG}: interrupted by {signal.Signals(signum).name}\n")
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "help":
        return _help(parser, args.topic)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _seeds_from_flags(args)
    from secrets_nats_kv.app import commands, integrity_commands
    from secrets_nats_kv.app.interrupts import Interrupted, run_interruptible

    try:
        handler = integrity_commands.handler_for(args) or commands.dispatch
        return run_interruptible(handler, args)
    except Interrupted as stop:
        sys.stderr.write(f"{PROG}: {stop}\n")
        return stop.code
    except SecretsBackendError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except BaseExceptionGroup as group:  # a failure inside a task group (run, dev)
        known = _project_error(group)
        if known is None:
            if os.environ.get("SECRETS_NATS_KV_DEBUG"):
                raise
            sys.stderr.write(f"{PROG}: internal error: {_first_leaf(group)}\n")
            return 2
        sys.stderr.write(f"{PROG}: error: {known}\n")
        return 1
    except Exception as exc:
        if os.environ.get("SECRETS_NATS_KV_DEBUG"):
            raise
        sys.stderr.write(f"{PROG}: internal error: {type(exc).__name__}\n")
        return 2


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> str:
    """The class of the first plain exception inside a group (never its text)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_leaf(exc)
        return type(exc).__name__
    return "ExceptionGroup"


if __name__ == "__main__":
    raise SystemExit(main())
