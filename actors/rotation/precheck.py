"""Before an online rotation: every answering backend must already hold the new key.

A backend that folds the write fence and then the swapped log must open what the new
key sealed, so each one answering (its micro-service stats, gathered by the caller with
the `status` machinery) must report the new key as its current or its next encryption
key. One that does not is named in a one-line refusal: roll it to "current + next"
first (NEXT_ENCRYPTION_XKEY_SEED). With none answering the online rotation is just an
offline one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from actors.rotation.report import RotationRefused

CURRENT, NEXT = "encryption", "next_encryption"  # the keys of the stats' public keys


@dataclass(frozen=True)
class BackendKeys:
    """One answering backend instance and the encryption keys it says it holds."""

    instance: str
    current: str | None
    next: str | None

    @classmethod
    def of(cls, instance: str, public_keys: Mapping[str, object]) -> BackendKeys:
        """From the `public_keys` of an instance's stats (`actors.service.STATS_KEYS`)."""

        def key(name: str) -> str | None:
            value = public_keys.get(name)
            return value if isinstance(value, str) and value else None

        return cls(instance, key(CURRENT), key(NEXT))


def check_backends(backends: Iterable[BackendKeys], new_key: str) -> None:
    """Refuse, naming the first instance that holds `new_key` neither as current nor next."""
    for backend in backends:
        if new_key in (backend.current, backend.next):
            continue
        holds = f"current {backend.current or '?'}"
        if backend.next:
            holds += f", next {backend.next}"
        raise RotationRefused(
            f"backend instance {backend.instance} does not hold the new key {new_key} "
            f"({holds}): restart it with NEXT_ENCRYPTION_XKEY_SEED set to the new key first"
        )
