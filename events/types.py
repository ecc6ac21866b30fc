"""The backend's events: one tagged union for the one event stream.

Events are frozen msgspec structs encoded as JSON with a `type` tag. New fields must get
defaults so old logs keep decoding (msgspec schema evolution). A secret value only ever
appears as `sealed`: the plaintext sealed by the encryption xkey to itself (xkv1), the
same bytes the `WASMCLOUD_SECRETS` KV view stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import msgspec

from secrets_nats_kv.decoding import DECODE_FAILURES, why_undecodable
from secrets_nats_kv.errors import SecretsBackendError

SecretKind = Literal["string", "binary"]


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every event carries: who caused it, under which request, and when."""

    at: float
    admin_key: str = ""
    authenticated: bool = True
    request_id: str = ""


class SecretPut(_Event, frozen=True, tag="secret_put"):
    name: str
    sealed: bytes
    kind: SecretKind = "string"


class SecretDeleted(_Event, frozen=True, tag="secret_deleted"):
    name: str
    purged: bool = False  # imported: the original's KV purge marker (history gone), not a delete


class SecretUndeleted(_Event, frozen=True, tag="secret_undeleted"):
    name: str


class SecretDestroyed(_Event, frozen=True, tag="secret_destroyed"):
    """Crypto-shred: the listed versions' sealed bytes are erased from the log and the KV."""

    name: str
    versions: tuple[int, ...] = ()
    erased_seqs: tuple[int, ...] = ()
    # The SHA-256 of each erased entry's stored bytes, in `erased_seqs` order: the chain
    # commits to them, so a reader carries it across the gaps once the bytes are gone.
    erased_digests: tuple[str, ...] = ()
    # The request ids of the erased puts: a replay of one stays refused after its bytes
    # (and JetStream's duplicate window) are gone.
    erased_request_ids: tuple[str, ...] = ()
    all: bool = False


class MappingAdded(_Event, frozen=True, tag="mapping_added"):
    entity: str
    secrets: tuple[str, ...]


class MappingRemoved(_Event, frozen=True, tag="mapping_removed"):
    entity: str
    secrets: tuple[str, ...]


class KeyRotated(_Event, frozen=True, tag="key_rotated"):
    """The encryption key changed; every sealed value before this event was re-sealed."""

    old_key: str
    new_key: str


class WritesFenced(_Event, frozen=True, tag="writes_fenced"):
    """An online key rotation (`rotate-key --online`) stops writes at this position.

    Appended to the live log under the current key once the rotation's copy has caught
    up; every backend folding it refuses writes (`RotationInProgress`) until the staged
    log's `KeyRotated` to `new_key` replaces the live one, or a `FenceLifted` for the
    same `rotation` lifts it. Gets are never fenced.
    """

    new_key: str
    rotation: str  # a random id of the rotation run


class FenceLifted(_Event, frozen=True, tag="fence_lifted"):
    """A rotation gave up (`--abort`, or a run that cannot finish): writes resume."""

    rotation: str
    reason: str = ""


class OriginalImported(_Event, frozen=True, tag="original_imported"):
    """The start of an import of the original secrets-nats-kv's buckets (`import`).

    It heads the log and says what follows: `entries` events whose encoded bodies hash
    to `digest`, so a re-run after a crash knows whether the log holds all of them, and
    whether what it holds is what the original's buckets still say. The counts are for
    the audit log; no value is ever part of this record.
    """

    secrets_bucket: str
    state_bucket: str
    entries: int
    digest: str
    secrets_revision: int = 0  # the original secrets bucket's last revision
    state_revision: int = 0  # the original state bucket's last revision
    secrets: int = 0
    versions: int = 0
    deleted: int = 0
    mappings: int = 0
    bytes: int = 0


class RevisionsSkipped(_Event, frozen=True, tag="revisions_skipped"):
    """Imported: bucket revisions the original no longer holds (history limit, purge).

    They are counted so every imported version keeps its number, and stay absent.
    """

    secret_revisions: int = 0
    state_revisions: int = 0


class LogRepaired(_Event, frozen=True, tag="log_repaired"):
    """An operator accepted a broken chain (`secrets-nats-kv repair`), on the record.

    `lost`: positions missing from the log that no destroy names (their content is
    unknown: the fold counts each as an erased revision, so no version is handed out
    twice). `relinked`: the entries after them, whose own link is accepted as it stands.
    """

    lost: tuple[int, ...] = ()
    relinked: tuple[int, ...] = ()
    reason: str = ""
    # Where the anchor stood if the log had been cut back behind it (0: it had not): the
    # operator accepts the rollback, and the anchor moves to this event.
    anchor_seq: int = 0


class ForeignDropped(_Event, frozen=True, tag="foreign_dropped"):
    """An operator removed entries that are not ours from the log (`repair`), on the record.

    `ranges`: the positions, as inclusive `(first, last)` runs (a flood is one run), that
    held entries not tagged by our key and are erased after this event is written. They
    were never part of the chain: a reader carries the link across them unchanged, so
    naming a position that held an entry of ours breaks the chain at the next one. They
    change no secret, mapping or revision number. `count`: how many positions.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    count: int = 0
    reason: str = ""

    def positions(self) -> Iterator[int]:
        for first, last in self.ranges:
            yield from range(first, last + 1)


def as_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Positions as inclusive runs, in order (`ForeignDropped.ranges`)."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


Event = (
    SecretPut
    | SecretDeleted
    | SecretUndeleted
    | SecretDestroyed
    | MappingAdded
    | MappingRemoved
    | KeyRotated
    | WritesFenced
    | FenceLifted
    | OriginalImported
    | RevisionsSkipped
    | LogRepaired
    | ForeignDropped
)


class Rejected(msgspec.Struct, frozen=True):
    """A log entry the fold must skip: not our event, or not tagged for its position.

    Not part of the union: it is never written, only read.
    """

    reason: str


# The log's own records, written under the `key` subject (`events.log.subject_of`).
LOG_RECORDS = (KeyRotated, LogRepaired, WritesFenced, FenceLifted, ForeignDropped)
SECRET_EVENTS = (SecretPut, SecretDeleted, SecretUndeleted, SecretDestroyed)
MAPPING_EVENTS = (MappingAdded, MappingRemoved)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


class UndecodableEvent(SecretsBackendError):
    """A message on the event stream that is not one of our events."""


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    try:
        return _decoder.decode(data)
    except DECODE_FAILURES:
        raise UndecodableEvent(f"not an event: {why_undecodable(data, Event)}") from None


def event_type(event: Event) -> str:
    """The `type` tag of an event, as written in the log."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag
