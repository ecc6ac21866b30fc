"""Which function runs each CLI command, once `cli` has parsed it.

One table, so that `cli` needs to know no command's module, and the command modules
need not know each other.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from secrets_nats_kv.app import (
    admin_commands,
    backup,
    commands,
    get_command,
    import_command,
    operator_commands,
    status,
)
from secrets_nats_kv.errors import SecretsBackendError

COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "run": commands.cmd_run,
    "dev": commands.cmd_dev,
    "put": admin_commands.cmd_put,
    "get": get_command.cmd_get,
    "add-mapping": admin_commands.cmd_add_mapping,
    "remove-mapping": admin_commands.cmd_remove_mapping,
    "keys": operator_commands.cmd_keys,
    "list": admin_commands.cmd_list,
    "mappings": admin_commands.cmd_mappings,
    "delete": admin_commands.cmd_delete,
    "undelete": admin_commands.cmd_undelete,
    "destroy": admin_commands.cmd_destroy,
    "rebuild": operator_commands.cmd_rebuild,
    "audit": operator_commands.cmd_audit,
    "rotate-key": commands.cmd_rotate_key,
    "backup": backup.cmd_backup,
    "restore": backup.cmd_restore,
    "status": status.cmd_status,
    "import": import_command.cmd_import,
    "nats-permissions": operator_commands.cmd_nats_permissions,
}


async def dispatch(args: argparse.Namespace) -> int:
    command = COMMANDS.get(args.command)
    if command is None:
        raise SecretsBackendError(f"unknown command {args.command}")
    return await command(args)
