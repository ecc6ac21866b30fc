"""The pieces every command's parser is built from, and argparse made to fail in one line.

Shared so that a flag (`--nats-address`, `-n`, `-b`, a seed flag) means and reads the
same in every command, and `--help` never shows a default that may be a secret.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from secrets_nats_kv import config

PROG = "secrets-nats-kv"


# Seeds may come as flags (the original's `-e`/`-t`); the environment is the better place.
SEED_FLAGS = {
    "encryption_xkey_seed": "ENCRYPTION_XKEY_SEED",
    "transit_xkey_seed": "TRANSIT_XKEY_SEED",
}
# Options whose value is never shown as a default in --help (it may come from the environment).
_UNSHOWN_DEFAULTS = frozenset({"nats_password", "string", "binary", *SEED_FLAGS, "help", "version"})
MAX_VERSION = 2**64 - 1


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too, with the same prefix as every failure.

    Scripts look for `secrets-nats-kv: error:`; a subcommand's usage error names the
    subcommand after it instead of before it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"{PROG}: error: {where}{message}\n")
        raise SystemExit(2)


class DefaultsShown(argparse.HelpFormatter):
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


def env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def add_nats(parser: argparse.ArgumentParser) -> None:
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


def add_names(parser: argparse.ArgumentParser, *, bucket: bool = True) -> None:
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


def add_seed(parser: argparse.ArgumentParser, dest: str, short: str) -> None:
    env = SEED_FLAGS[dest]
    parser.add_argument(
        short,
        "--" + dest.replace("_", "-"),
        dest=dest,
        metavar="SEED",
        default=None,
        help=f"prefer env {env}: a flag is visible in the process list",
    )


def add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="lowest level logged",
    )


def add_rewrite_options(parser: argparse.ArgumentParser) -> None:
    """rebuild and rotate-key recreate the KV buckets: with the run's settings."""
    parser.add_argument(
        "--max-secret-history",
        type=int,
        default=config.DEFAULT_MAX_SECRET_HISTORY,
        help="KV history kept per secret",
    )
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the buckets")


def add_command(commands: Any, name: str, text: str, *, seed: str | None = None) -> Any:
    """A command's parser, with its help line and the seed flag it takes, if any."""
    parser = commands.add_parser(name, help=text, description=text)
    if seed == "transit":
        add_seed(parser, "transit_xkey_seed", "-t")
    elif seed == "encryption":
        add_seed(parser, "encryption_xkey_seed", "-e")
    return parser
