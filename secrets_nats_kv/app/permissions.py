"""`secrets-nats-kv nats-permissions`: the least-privilege profile, ready to paste.

The lists come from `secrets_nats_kv.permissions`; this module only writes them in the
three shapes operators use: a nats-server `authorization` block (`conf`), `nsc add user`
commands for operator mode (`nsc`), and plain JSON for anything else. The tests start
nats-servers from the `conf` text itself, so what is printed is what was tested.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.permissions import NatsRole, Permissions, inbox_prefix, profile

FORMATS = ("conf", "nsc", "json")


def user_name(role: NatsRole) -> str:
    return f"secrets-{role.value}"


def _default_credentials(role: NatsRole) -> str:
    variable = f"SECRETS_{role.value.upper()}_PASSWORD"
    return f"user: {json.dumps(user_name(role))}, password: ${variable}"


def _list(subjects: Iterable[str], indent: str) -> str:
    inner = "".join(f"{indent}  {json.dumps(subject)}\n" for subject in subjects)
    return f"[\n{inner}{indent}]"


def _conf_permissions(permissions: Permissions, indent: str) -> str:
    lines = [
        f"{indent}publish: {{ allow: {_list(permissions.publish, indent + '  ')} }}",
        f"{indent}subscribe: {{ allow: {_list(permissions.subscribe, indent + '  ')} }}",
    ]
    if permissions.allow_responses:
        lines.append(f"{indent}allow_responses: true")
    return "\n".join(lines)


def render_conf(
    names: BackendNames,
    roles: Iterable[NatsRole],
    credentials: Mapping[NatsRole, str] | None = None,
) -> str:
    """A nats-server `authorization` block with one user per role.

    `credentials` maps a role to the user's identifying fields (default: a user name and
    a password taken from the server's environment, `$SECRETS_BACKEND_PASSWORD` etc.).
    """
    users = []
    for role in roles:
        who = (credentials or {}).get(role) or _default_credentials(role)
        block = _conf_permissions(profile(names, role), "        ")
        users.append(f"    {{ {who}, permissions: {{\n{block}\n    }} }}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def render_nsc(names: BackendNames, roles: Iterable[NatsRole]) -> str:
    """`nsc add user` commands, one per role, for an operator-mode (JWT) deployment."""
    commands = []
    for role in roles:
        permissions = profile(names, role)
        parts = [f'nsc add user --account "$ACCOUNT" --name {user_name(role)}']
        parts += [f"--allow-pub {shlex.quote(subject)}" for subject in permissions.publish]
        parts += [f"--allow-sub {shlex.quote(subject)}" for subject in permissions.subscribe]
        if permissions.allow_responses:
            parts.append("--allow-pub-response")
        commands.append(" \\\n  ".join(parts))
    return "\n\n".join(commands) + "\n"


def as_json(names: BackendNames, roles: Iterable[NatsRole]) -> dict[str, object]:
    return {
        role.value: {
            "publish": {"allow": list(p.publish)},
            "subscribe": {"allow": list(p.subscribe)},
            "allow_responses": p.allow_responses,
            "inbox_prefix": inbox_prefix(names, role),
        }
        for role in roles
        for p in (profile(names, role),)
    }


def render(names: BackendNames, roles: Iterable[NatsRole], fmt: str) -> str:
    roles = list(roles)
    if fmt == "conf":
        return render_conf(names, roles)
    if fmt == "nsc":
        return render_nsc(names, roles)
    return json.dumps(as_json(names, roles), indent=2) + "\n"


def add_parser(
    commands: argparse._SubParsersAction[Any],
) -> argparse.ArgumentParser:
    """The `nats-permissions` subcommand (its naming flags are added by the caller)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "nats-permissions", help="print the least-privilege NATS permissions of each role"
    )
    parser.add_argument("--role", choices=[role.value for role in NatsRole], default=None)
    parser.add_argument("--format", choices=FORMATS, default="conf", dest="permissions_format")
    return parser


def roles_of(args: argparse.Namespace) -> list[NatsRole]:
    return [NatsRole(args.role)] if args.role else list(NatsRole)
