"""The transit keyring: current first, previous keys after, usage bounded per key."""

from __future__ import annotations

import pytest

from actors.transit import HOSTS_REMEMBERED, TransitKeys
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.xkeys import XKey


def test_each_key_opens_what_was_sealed_to_it_and_says_which_it_was() -> None:
    current, first, second = XKey.generate(), XKey.generate(), XKey.generate()
    keys = TransitKeys(current, (first, second))
    host = XKey.generate()
    for key in (current, first, second):
        plaintext, used = keys.open(host.seal(b"request", key.public_key), host)
        assert plaintext == b"request"
        assert used is key
    with pytest.raises(DecryptionError):
        keys.open(host.seal(b"request", XKey.generate().public_key), host)


def test_usage_counts_previous_keys_only_and_keeps_the_latest_hosts() -> None:
    now = [1000.0]
    current, old = XKey.generate(), XKey.generate()
    keys = TransitKeys(current, (old,), clock=lambda: now[0])
    keys.note_use(current, "N-current")  # the current key is not tracked
    for n in range(HOSTS_REMEMBERED + 5):
        now[0] += 1
        keys.note_use(old, f"N{n}")
    keys.note_use(old, "N0")  # seen again: moves to the newest
    [usage] = keys.snapshot()
    assert usage["requests"] == HOSTS_REMEMBERED + 6
    hosts = usage["hosts"]
    assert isinstance(hosts, list)
    assert len(hosts) == HOSTS_REMEMBERED
    assert hosts[-1] == "N0"
    assert usage["last_used"] == now[0]
