"""What may be a secret name or an entity: the rules of NATS KV keys and of nkeys.

A secret name becomes a KV key and a subject suffix of the event log, so it must be a
valid KV key (PROTOCOL.md §6) with no empty subject token.
"""

from __future__ import annotations

import re

from secrets_nats_kv.errors import InvalidKey, InvalidSecretName
from secrets_nats_kv.nkeys import Role, decode_public

MAX_SECRET_NAME = 255
RESERVED_PREFIX = "_secrets-nats-kv"
_KV_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")


def validate_secret_name(name: str) -> str:
    """Return `name` if it can be a secret's name, else raise `InvalidSecretName`."""
    if not name:
        raise InvalidSecretName("empty")
    if len(name) > MAX_SECRET_NAME:
        raise InvalidSecretName(f"longer than {MAX_SECRET_NAME} characters")
    if not _KV_KEY.fullmatch(name):
        raise InvalidSecretName(f"{name!r} may only contain A-Z a-z 0-9 - _ = / .")
    if name.startswith(".") or name.endswith(".") or ".." in name:
        raise InvalidSecretName(f"{name!r} has a leading, trailing or doubled '.'")
    if name.startswith(RESERVED_PREFIX):
        raise InvalidSecretName(f"names starting {RESERVED_PREFIX!r} are reserved")
    return name


def validate_entity(entity: str) -> str:
    """Return `entity` if it is a component (M…) or provider (V…) public key."""
    decode_public(entity, Role.MODULE, Role.SERVICE)
    return entity


__all__ = ["InvalidKey", "validate_entity", "validate_secret_name"]
