"""Which function runs each CLI command, once `cli` has parsed it.

One table, so that `cli` needs to know no command's module and the command modules need
not know each other. A command's module is imported only when that command runs: every
CLI invocation then pays for the imports of one command, not of all of them
(tests/unit/test_dispatch.py checks that every entry names a command function).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Awaitable, Callable

from secrets_nats_kv.errors import SecretsBackendError

Command = Callable[[argparse.Namespace], Awaitable[int]]

# command -> (module in secrets_nats_kv.app, function)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("commands", "cmd_run"),
    "dev": ("commands", "cmd_dev"),
    "put": ("admin_commands", "cmd_put"),
    "get": ("get_command", "cmd_get"),
    "add-mapping": ("admin_commands", "cmd_add_mapping"),
    "remove-mapping": ("admin_commands", "cmd_remove_mapping"),
    "keys": ("operator_commands", "cmd_keys"),
    "list": ("admin_commands", "cmd_list"),
    "mappings": ("admin_commands", "cmd_mappings"),
    "delete": ("admin_commands", "cmd_delete"),
    "undelete": ("admin_commands", "cmd_undelete"),
    "destroy": ("admin_commands", "cmd_destroy"),
    "rebuild": ("operator_commands", "cmd_rebuild"),
    "audit": ("operator_commands", "cmd_audit"),
    "rotate-key": ("commands", "cmd_rotate_key"),
    "backup": ("backup", "cmd_backup"),
    "restore": ("backup", "cmd_restore"),
    "status": ("status", "cmd_status"),
    "import": ("import_command", "cmd_import"),
    "nats-permissions": ("operator_commands", "cmd_nats_permissions"),
}


def command_for(name: str) -> Command:
    """The function that runs command `name` (its module imported now)."""
    entry = COMMANDS.get(name)
    if entry is None:
        raise SecretsBackendError(f"unknown command {name}")
    module, function = entry
    command: Command = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return command


async def dispatch(args: argparse.Namespace) -> int:
    return await command_for(args.command)(args)
