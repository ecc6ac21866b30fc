"""The `secrets-nats-kv` command line: the original's commands, flags and variables, and more.

Parsing lives in `parsers/`; what each command does, in the modules `dispatch` names. Every
failure the project knows of ends as one line on stderr and a non-zero exit, never a
traceback (set SECRETS_NATS_KV_DEBUG=1 to see one for an unexpected failure).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from secrets_nats_kv import __version__
from secrets_nats_kv.app.parsers.client import add_client_parsers
from secrets_nats_kv.app.parsers.operator import add_operator_parsers
from secrets_nats_kv.app.parsers.options import PROG, SEED_FLAGS, Parser
from secrets_nats_kv.app.parsers.run import add_dev_parser, add_run_parser
from secrets_nats_kv.errors import SecretsBackendError

SEED_FLAG_WARNING = (
    f"{PROG}: warning: a seed given as a flag is visible to every user of this machine "
    "in the process list; prefer the environment variable"
)


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser, in the order `--help` lists them (see `parsers/`)."""
    parser = Parser(prog=PROG, description="A wasmCloud secrets backend on NATS JetStream.")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser, metavar="COMMAND"
    )
    add_run_parser(commands)
    add_dev_parser(commands)
    add_client_parsers(commands)
    add_operator_parsers(commands)
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
    from secrets_nats_kv.app import dispatch, integrity_commands
    from secrets_nats_kv.app.interrupts import Interrupted, run_interruptible

    try:
        handler = integrity_commands.handler_for(args) or dispatch.dispatch
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
