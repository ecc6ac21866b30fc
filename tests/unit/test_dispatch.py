"""The command table names a command function for every command the parser knows."""

from __future__ import annotations

import argparse
import inspect

import pytest

from secrets_nats_kv.app import cli, dispatch, integrity_commands
from secrets_nats_kv.errors import SecretsBackendError


def parsed_commands() -> set[str]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(commands.choices) - {"help"}


def test_every_parsed_command_has_a_function_and_every_entry_a_command() -> None:
    answered = set(dispatch.COMMANDS) | set(integrity_commands.COMMANDS)
    assert parsed_commands() == answered


@pytest.mark.parametrize("name", sorted(dispatch.COMMANDS))
def test_each_entry_is_a_command_function(name: str) -> None:
    command = dispatch.command_for(name)
    assert inspect.iscoroutinefunction(command), name
    assert list(inspect.signature(command).parameters) == ["args"], name


def test_an_unknown_command_is_our_error() -> None:
    with pytest.raises(SecretsBackendError, match="unknown command frobnicate"):
        dispatch.command_for("frobnicate")
