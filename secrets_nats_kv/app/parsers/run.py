"""The parsers of `run` (a backend on an existing NATS) and `dev` (on a bundled one)."""

from __future__ import annotations

import argparse
from typing import Any

from secrets_nats_kv import config, limits
from secrets_nats_kv.app.parsers.options import (
    Parser,
    add_logging,
    add_names,
    add_nats,
    add_seed,
    env_list,
)


def add_run_parser(commands: Any) -> None:
    run = commands.add_parser("run", help="run the backend (connects to an existing NATS)")
    add_seed(run, "encryption_xkey_seed", "-e")
    add_seed(run, "transit_xkey_seed", "-t")
    add_nats(run)
    add_names(run)
    _add_run_options(run)


def add_dev_parser(commands: Any) -> None:
    dev = commands.add_parser(
        "dev", help="development: start the bundled nats-server and a backend on it"
    )
    dev.add_argument("--data-dir", default=".secrets-nats-kv", help="where seeds and data live")
    dev.add_argument(
        "--nats-address", default=config.DEFAULT_NATS_ADDRESS, help="where nats-server listens"
    )
    _add_next_encryption(dev)
    add_logging(dev)
    dev_commands = dev.add_subparsers(dest="dev_command", parser_class=Parser, metavar="")
    dev_rotate = dev_commands.add_parser(
        "rotate-key",
        help="re-encrypt the dev store under a fresh encryption key (stop `dev` first)",
    )
    # Also after the subcommand; SUPPRESS keeps dev's own value when not repeated here.
    dev_rotate.add_argument("--data-dir", default=argparse.SUPPRESS, help="as for dev")
    dev_rotate.add_argument("--nats-address", default=argparse.SUPPRESS, help="as for dev")


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
        default=env_list("ADMIN_XKEYS"),
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
        default=env_list("TRUSTED_ISSUERS"),
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
    add_logging(parser)


def _add_next_encryption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--next-encryption-xkey-seed-file",
        metavar="FILE",
        help="the key an online rotate-key moves to, held beside the current one "
        "(env NEXT_ENCRYPTION_XKEY_SEED)",
    )
