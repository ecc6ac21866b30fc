"""One live entry as the staging stream gets it: re-sealed, re-tagged, re-chained.

Both copies share this: the offline one (`copy.stage`, one pass over a still log) and
the online one (`catchup.LiveCopy`, passes over a log that grows while it copies). The
old log's chain is checked as it is read (`ChainReader`, old key), so a tampered log is
never laundered into a fresh valid chain; the new chain is computed as entries are
converted, a gap (an erased position) in the erased form.

Entries the old key does not authenticate (forgeries) stay rejected: an empty, untagged
placeholder keeps their position.
"""

from __future__ import annotations

import time

import msgspec

from actors.rotation.context import RotationRun
from actors.rotation.report import Counts, RotationRefused
from events.chain import ChainBroken, ChainReader, Raw, WrongKey
from events.codec import Encoded, EventCodec
from events.types import (
    Event,
    KeyRotated,
    SecretDestroyed,
    SecretPut,
    UndecodableEvent,
    decode_event,
)
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import GENESIS
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.nats.reader import RawMessage
from secrets_nats_kv.xkeys import SealBox

EARLY_REJECTS = 8  # this many rejected entries before any valid one: the old key is wrong
WRONG_OLD_KEY = (
    "ENCRYPTION_XKEY_SEED does not authenticate the event log: "
    "it must be the key the backend runs with now"
)

# An entry as it is to be written: subject, body, headers (None: an untagged placeholder).
Converted = tuple[str, bytes, dict[str, str] | None]


def patched_put(body: bytes, sealed: bytes) -> bytes:
    """The put's JSON with only `sealed` replaced: fields this version does not know survive."""
    document = msgspec.json.decode(body)
    document["sealed"] = sealed
    return msgspec.json.encode(document)


def patched_destroy(body: bytes, event: SecretDestroyed, staged: dict[int, str]) -> bytes:
    """The destroy's JSON with the digests of the positions in `staged` replaced by the
    digests of the staged bodies there (the bytes the staged chain committed to)."""
    document = msgspec.json.decode(body)
    digests = list(event.erased_digests)
    for index, seq in enumerate(event.erased_seqs):
        if seq in staged and index < len(digests):
            digests[index] = staged[seq]
    document["erased_digests"] = digests
    return msgspec.json.encode(document)


class Resealer:
    """Converts the live log's positions in order; holds both chains' state between calls."""

    def __init__(self, run: RotationRun, counts: Counts, *, publish: bool) -> None:
        self._run = run
        self._counts = counts
        self._publish = publish
        self._old_box, self._new_box = SealBox(run.old, run.old), SealBox(run.new, run.new)
        self._checker = ChainReader(EventCodec(run.old_auth))
        self._codec = EventCodec(run.new_auth)
        self.link = GENESIS  # the new chain, as far as it is converted
        self.last_event: Event | None = None  # the event `convert` last converted, if any

    @property
    def verified_to(self) -> int:
        """The last position the old chain has verified (entries behind a gap are held)."""
        return self._checker.seq

    @property
    def old_link(self) -> str:
        """The old chain's link at `verified_to`: what an append after it must follow."""
        return self._checker.link

    def event_of(self, raw: RawMessage) -> Event | None:
        """The event at `raw` if the old key authenticates it there, else None."""
        if not self._run.old_auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER)):
            return None
        try:
            return decode_event(raw.data)
        except UndecodableEvent:
            return None

    def gap(self, seq: int) -> None:
        self._checker.push(Raw(seq, 0.0, None))
        self.link = self._codec.erased_link(seq, self.link)

    def convert(self, raw: RawMessage, staged: dict[int, str] | None = None) -> Converted:
        """`raw` for staging; `staged`: digests of staged bodies a destroy here names."""
        run, counts = self._run, self._counts
        self._checker.push(Raw(raw.seq, 0.0, raw.data, raw.headers))
        event = self.last_event = self.event_of(raw)
        if event is None and run.new_auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER)):
            raise RotationRefused(
                f"event #{raw.seq} of {run.live} is already tagged for the new key: "
                "the log is half rotated by other means; restore it before rotating"
            )
        if event is None:
            counts.rejected += 1
            if counts.events == 0 and counts.rejected >= EARLY_REJECTS:
                raise RotationRefused(WRONG_OLD_KEY)
            return f"{run.staging_prefix}.rejected", b"", None
        counts.events += 1
        body = raw.data
        if isinstance(event, SecretPut):
            try:
                plaintext = self._old_box.open(event.sealed)
            except DecryptionError:
                raise RotationRefused(
                    f"the value of {event.name!r} at event #{raw.seq} does not open with "
                    "ENCRYPTION_XKEY_SEED"
                ) from None
            counts.resealed += 1
            if not self._publish:
                return "", body, None
            body = patched_put(body, self._new_box.seal(plaintext))
        elif isinstance(event, SecretDestroyed) and staged:
            body = patched_destroy(body, event, staged)
        encoded = self._codec.encode_body(body, raw.seq, self.link)
        self.link = encoded.link
        suffix = run.subjects.subject_for(event)[len(run.live_prefix) :]
        return run.staging_prefix + suffix, body, encoded.headers

    def check_chain(self) -> None:
        """At the head: everything read must verify under the old key (else refuse)."""
        try:
            self._checker.at_head()
        except WrongKey:
            raise RotationRefused(WRONG_OLD_KEY) from None
        except ChainBroken as exc:
            raise RotationRefused(
                f"{exc}: run `secrets-nats-kv verify` and `repair` before rotating"
            ) from None
        if self._counts.events == 0 and self._counts.rejected:
            raise RotationRefused(WRONG_OLD_KEY)

    def marker(self, seq: int) -> Encoded:
        """The closing `KeyRotated` at `seq`, tagged and chained for the new key."""
        run = self._run
        event = KeyRotated(at=time.time(), old_key=run.old.public_key, new_key=run.new.public_key)
        encoded = self._codec.encode(event, seq, self.link)
        self.link = encoded.link
        return encoded
