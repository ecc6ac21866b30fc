"""The transit keys a backend opens host requests with: the current one and an overlap.

A wasmCloud host fetches `server_xkey` once per backend and caches it for the life of
its process, so after the transit key is rotated every running host still seals to the
old one. The backend therefore keeps opening requests sealed to previous keys
(`PREVIOUS_TRANSIT_XKEY_SEEDS`) while `server_xkey` answers only the current one, and
remembers, per previous key, when it was last used and by which hosts: the operator
drops a previous key once no host has used it for long enough.

Only `get` goes through the overlap. Admin clients ask `server_xkey` every run, so they
follow the current key; a previous transit key is never an admin key.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.xkeys import XKey

HOSTS_REMEMBERED = 16
"""Per previous key, the most recent distinct hosts kept (a bound: hosts are many)."""


@dataclass
class KeyUsage:
    """When a previous transit key was last used, and by which (verified) hosts."""

    last_used: float = 0.0
    requests: int = 0
    hosts: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def note(self, at: float, host: str | None) -> None:
        self.last_used = at
        self.requests += 1
        if host is not None:
            self.hosts.pop(host, None)
            self.hosts[host] = None
            while len(self.hosts) > HOSTS_REMEMBERED:
                self.hosts.popitem(last=False)


class TransitKeys:
    """Opens a request with the current transit key, else with each previous one in turn.

    The keys come checked from `BackendConfig` (seeds, no repeats).
    """

    def __init__(
        self,
        current: XKey,
        previous: Sequence[XKey] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.current = current
        self.previous = tuple(previous)
        self._clock = clock
        self._usage = {key.public_key: KeyUsage() for key in self.previous}

    def open(self, sealed: bytes, sender: XKey) -> tuple[bytes, XKey]:
        """The plaintext and the key that opened it; the current key's error if none does."""
        try:
            return self.current.open(sealed, sender), self.current
        except DecryptionError as failure:
            for key in self.previous:
                try:
                    return key.open(sealed, sender), key
                except DecryptionError:
                    continue
            raise failure from None

    def note_use(self, key: XKey, host: str | None) -> None:
        """Remember that `host` (a verified host key, or None) used `key`, if previous."""
        usage = self._usage.get(key.public_key)
        if usage is not None:
            usage.note(self._clock(), host)

    def snapshot(self) -> list[dict[str, object]]:
        """Per previous key, oldest rotation last: its last use and the hosts that used it."""
        return [
            {
                "public_key": key.public_key,
                "last_used": usage.last_used or None,
                "requests": usage.requests,
                "hosts": list(usage.hosts),
            }
            for key in self.previous
            for usage in (self._usage[key.public_key],)
        ]
