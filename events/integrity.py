"""Tamper evidence for the event log: every event is tagged for its exact position.

Anyone allowed to publish on the bus could otherwise append a forged `MappingAdded` to
the stream, or replay an old one. Each append is conditional on the stream's last
sequence (`Nats-Expected-Last-Sequence`), so its position is known when it is written,
and carries an HMAC-SHA256 over (position, body) keyed from the encryption key. A reader
holding that key folds only events whose tag matches where they stand.
"""

from __future__ import annotations

import hashlib
import hmac

from secrets_nats_kv.xkeys import XKey

TAG_HEADER = "Secrets-Event-Tag"
_CONTEXT = b"secrets-nats-kv/event-tag/v1"


class EventAuthenticator:
    """Makes and checks the position-bound tag of each event."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def for_key(cls, encryption: XKey) -> EventAuthenticator:
        return cls(encryption.derive_key(_CONTEXT))

    def tag(self, seq: int, body: bytes) -> str:
        mac = hmac.new(self._key, seq.to_bytes(8, "big") + body, hashlib.sha256)
        return mac.hexdigest()

    def verify(self, seq: int, body: bytes, tag: str | None) -> bool:
        return tag is not None and hmac.compare_digest(self.tag(seq, body), tag)

    def __repr__(self) -> str:
        return "EventAuthenticator(<key hidden>)"
