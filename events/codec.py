"""The event codec: an event becomes stored bytes and headers, and back (eventsourcing's Mapper).

Every writer of the log (the appender, `import`, `rotate-key`, `repair`, the bench
fixtures) encodes through `EventCodec.encode` / `encode_run`, and every reader decodes
through `events.chain.ChainReader`, so the tag and the chain are computed in one place
(the `Barrier`). An entry at position `seq` is stored as:

    body    the event's JSON (msgspec, tagged by `type`)
    Secrets-Event-Tag    HMAC over (seq, body)                      entry tag
    Secrets-Event-Prev   the link of the previous accepted entry    (for `repair`)
    Secrets-Event-Chain  HMAC over (seq, SHA-256(body), previous)   chain link
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from events.types import Event, decode_event, encode_event
from secrets_nats_kv.barrier import (
    CHAIN_HEADER,
    ENTRY_TAG_HEADER,
    PREV_HEADER,
    Barrier,
    digest,
)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One entry ready to store at `seq`; `link` is what the next entry follows."""

    seq: int
    body: bytes
    headers: dict[str, str]
    link: str


class EventCodec:
    """Encode events for their position in the chain; check and decode stored entries."""

    __slots__ = ("barrier",)

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier

    def encode(self, event: Event, seq: int, previous: str) -> Encoded:
        """`event` stored at `seq`, following the entry whose link is `previous`."""
        return self.encode_body(encode_event(event), seq, previous)

    def encode_body(self, body: bytes, seq: int, previous: str) -> Encoded:
        """Already encoded bytes tagged and linked for `seq` (rotation re-tags this way)."""
        link = self.barrier.link(seq, digest(body), previous)
        headers = {
            ENTRY_TAG_HEADER: self.barrier.tag(seq, body),
            PREV_HEADER: previous,
            CHAIN_HEADER: link,
        }
        return Encoded(seq, body, headers, link)

    def encode_run(self, events: Iterable[Event], first_seq: int, previous: str) -> list[Encoded]:
        """Consecutive entries from `first_seq` on, each following the one before (batches)."""
        run: list[Encoded] = []
        for offset, event in enumerate(events):
            encoded = self.encode(event, first_seq + offset, previous)
            run.append(encoded)
            previous = encoded.link
        return run

    def erased_link(self, seq: int, previous: str) -> str:
        """The link a rewritten log gives a position whose bytes are already gone."""
        return self.barrier.erased_link(seq, previous)

    def authentic(self, seq: int, body: bytes, headers: Mapping[str, str] | None) -> bool:
        """Whether the entry was written by this key for exactly this position.

        An entry without a tag is refused before any HMAC is computed: junk costs a
        header lookup (whether a tag is there is no secret; only its value is compared
        in constant time)."""
        tag = (headers or {}).get(ENTRY_TAG_HEADER)
        if tag is None:
            return False
        return self.barrier.verify(seq, body, tag)

    @staticmethod
    def decode(body: bytes) -> Event:
        """The event in `body` (raises `UndecodableEvent`)."""
        return decode_event(body)

    def __repr__(self) -> str:
        return f"EventCodec({self.barrier!r})"
