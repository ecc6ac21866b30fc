"""The fold: what the event log means, as data.

`fold(state, seq, event)` advances a `ViewState` by one log entry and returns the KV
writes that entry implies. It reads nothing but its arguments and does no I/O, so the
live view, `rebuild` and `rotate-key` all share it and agree on every revision.

Revisions: every `SecretPut`, `SecretDeleted` and `SecretUndeleted` is one message in the
secrets KV bucket, so a secret's version (its KV revision) is a count over the log. An
erased entry (`event is None`: a put whose bytes `destroy` shredded) still counts one.
Every mapping event is one message in the state bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from events.types import (
    Event,
    FenceLifted,
    ForeignDropped,
    KeyRotated,
    LogRepaired,
    MappingAdded,
    MappingRemoved,
    OriginalImported,
    Rejected,
    RevisionsSkipped,
    SecretDeleted,
    SecretDestroyed,
    SecretKind,
    SecretPut,
    SecretUndeleted,
    WritesFenced,
)
from secrets_nats_kv.errors import SecretNotFound


@dataclass(slots=True)
class Version:
    """One value-bearing revision of a secret (a put, or an undelete's copy of one)."""

    revision: int
    origin: int  # the revision whose bytes these are: itself for a put
    event_seq: int  # the log entry holding those bytes (the origin put's sequence)
    kind: SecretKind
    sealed: bytes | None  # None once destroyed
    at: float
    origin_request: str = ""  # the request id of the put whose bytes these are


@dataclass(slots=True)
class SecretRecord:
    """One secret's KV entries; being deleted is derived from them, as a KV reader sees it."""

    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    revisions: list[int] = field(default_factory=list)  # every KV revision of the key
    markers: set[int] = field(default_factory=set)  # the delete markers among them
    updated_at: float = 0.0

    def _newest_entry(self) -> Version | bool | None:
        """The newest entry destroy left: a readable version, True (a marker), or None."""
        for revision in reversed(self.revisions):
            if revision in self.markers:
                return True
            version = self.versions.get(revision)
            if version is not None and version.sealed is not None:
                return version
        return None

    @property
    def deleted(self) -> bool:
        """Whether the newest entry left is a delete marker.

        Derived, not a flag set by the events: once destroy erases the entries after a
        delete, the secret is deleted again, as the KV bucket shows it, and a refold of
        the erased log (restart, rebuild, audit) reaches the same answer.
        """
        return self._newest_entry() is True

    def latest(self) -> Version | None:
        """The newest readable version, or None if deleted or nothing readable is left."""
        newest = self._newest_entry()
        return newest if isinstance(newest, Version) else None

    def newest_readable(self) -> Version | None:
        """The newest version whose bytes still exist, deleted or not (what undelete restores)."""
        for revision in reversed(self.revisions):
            version = self.versions.get(revision)
            if version is not None and version.sealed is not None:
                return version
        return None

    def version(self, revision: int) -> Version | None:
        """A pinned version, or None if it is not this secret's, destroyed, or deleted."""
        if self.deleted:
            return None
        version = self.versions.get(revision)
        if version is None or version.sealed is None:
            return None
        return version

    def live_versions(self) -> list[Version]:
        return [v for v in self.versions.values() if v.sealed is not None]


class Fence(NamedTuple):
    """Writes stopped by an online key rotation: its new key, its run id, its position."""

    new_key: str
    rotation: str
    seq: int


@dataclass(slots=True)
class ViewState:
    """Everything the backend knows, folded from the log up to `last_seq`."""

    secrets: dict[str, SecretRecord] = field(default_factory=dict)
    mappings: dict[str, set[str]] = field(default_factory=dict)
    last_seq: int = 0
    secrets_revision: int = 0  # last revision written to the secrets bucket
    state_revision: int = 0  # last revision written to the state bucket
    revision_of_seq: dict[int, int] = field(default_factory=dict)
    destroyed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # destroy seq -> versions
    erased_revisions: set[int] = field(default_factory=set)  # revisions of erased log entries
    encryption_key: str | None = None  # public key named by the last KeyRotated
    rejected: int = 0  # entries folded as Rejected (not ours, or not tagged for their place)
    last_mapping: str = ""  # the entity of the newest state-bucket write (for start-up checks)
    # Every admin request id the log has seen -> the entry it caused. A replay is answered
    # from here, at any instance, for ever; destroy keeps the ids of what it erases.
    requests: dict[str, int] = field(default_factory=dict)
    # Set by a `WritesFenced`, cleared by a `FenceLifted` or the rotated log's `KeyRotated`:
    # while set, the deciders refuse every write.
    fence: Fence | None = None


# --- the KV writes a log entry implies ------------------------------------------------------


class PutSecretEntry(NamedTuple):
    key: str
    revision: int
    sealed: bytes
    kind: SecretKind


class MarkSecretDeleted(NamedTuple):
    key: str
    revision: int
    operation: str = "DEL"  # the KV-Operation header: "PURGE" for an imported purge marker


class FillErasedRevision(NamedTuple):
    """An erased put's revision: write a placeholder so the count stays, then erase it."""

    revision: int


class FillStateRevision(NamedTuple):
    """A state-bucket revision the original no longer held: a placeholder, then erased."""

    revision: int


class EraseSecretRevisions(NamedTuple):
    revisions: tuple[int, ...]


class EraseEvents(NamedTuple):
    seqs: tuple[int, ...]


class PutMappingEntry(NamedTuple):
    entity: str
    revision: int
    secrets: tuple[str, ...]


Effect = (
    PutSecretEntry
    | MarkSecretDeleted
    | FillErasedRevision
    | FillStateRevision
    | EraseSecretRevisions
    | EraseEvents
    | PutMappingEntry
)


def fold(state: ViewState, seq: int, event: Event | Rejected | None) -> list[Effect]:
    """Apply log entry `seq` (None: erased) to `state` in place; return its KV writes.

    Entries at or below `state.last_seq` are redeliveries and change nothing; a
    `Rejected` entry (forged or unreadable) only moves the position on.
    """
    if seq <= state.last_seq:
        return []
    state.last_seq = seq
    if isinstance(event, SecretDestroyed):
        for erased, request_id in zip(event.erased_seqs, event.erased_request_ids, strict=False):
            if request_id:
                state.requests.setdefault(request_id, erased)
    if event is not None and not isinstance(event, Rejected) and event.request_id:
        state.requests.setdefault(event.request_id, seq)
    if event is None:
        state.secrets_revision += 1
        state.revision_of_seq[seq] = state.secrets_revision
        state.erased_revisions.add(state.secrets_revision)
        return [FillErasedRevision(state.secrets_revision)]
    match event:
        case SecretPut():
            return _put(state, seq, event)
        case SecretDeleted():
            return _delete(state, seq, event)
        case SecretUndeleted():
            return _undelete(state, seq, event)
        case SecretDestroyed():
            return _destroy(state, seq, event)
        case MappingAdded() | MappingRemoved():
            return _map(state, seq, event)
        case KeyRotated() | WritesFenced() | FenceLifted():
            return _rotation(state, seq, event)
        case OriginalImported() | LogRepaired() | ForeignDropped():
            return []  # records for the audit log: what follows them writes the buckets
        case RevisionsSkipped():
            return _skip(state, event)
        case Rejected():
            state.rejected += 1
            return []


def _rotation(
    state: ViewState, seq: int, event: KeyRotated | WritesFenced | FenceLifted
) -> list[Effect]:
    """An online rotation's marks: the fence it sets, and what ends it (the rotated log's
    `KeyRotated`, which also names the key, or a `FenceLifted` when the rotation gave up)."""
    if isinstance(event, WritesFenced):
        state.fence = Fence(event.new_key, event.rotation, seq)
    else:
        state.fence = None
        if isinstance(event, KeyRotated):
            state.encryption_key = event.new_key
    return []


def _next_secret_revision(state: ViewState, seq: int, record: SecretRecord, at: float) -> int:
    state.secrets_revision += 1
    revision = state.secrets_revision
    state.revision_of_seq[seq] = revision
    record.revisions.append(revision)
    record.updated_at = at
    return revision


def _record(state: ViewState, name: str) -> SecretRecord:
    record = state.secrets.get(name)
    if record is None:
        record = state.secrets[name] = SecretRecord(name)
    return record


def _put(state: ViewState, seq: int, event: SecretPut) -> list[Effect]:
    record = _record(state, event.name)
    revision = _next_secret_revision(state, seq, record, event.at)
    record.versions[revision] = Version(
        revision, revision, seq, event.kind, event.sealed, event.at, event.request_id
    )
    return [PutSecretEntry(event.name, revision, event.sealed, event.kind)]


def _delete(state: ViewState, seq: int, event: SecretDeleted) -> list[Effect]:
    record = _record(state, event.name)
    revision = _next_secret_revision(state, seq, record, event.at)
    record.markers.add(revision)
    return [MarkSecretDeleted(event.name, revision, "PURGE" if event.purged else "DEL")]


def _undelete(state: ViewState, seq: int, event: SecretUndeleted) -> list[Effect]:
    record = _record(state, event.name)
    source = record.newest_readable()
    if source is None or source.sealed is None:
        # The actor only undeletes what it can restore, so this is a refold (restart,
        # rebuild, audit) of a log where a later destroy erased the restored bytes; that
        # destroy lists this revision too, so it is spent as an already erased entry,
        # not one of the secret's (as the live fold ends up once the destroy comes).
        state.secrets_revision += 1
        revision = state.secrets_revision
        state.revision_of_seq[seq] = revision
        state.erased_revisions.add(revision)
        return [FillErasedRevision(revision)]
    revision = _next_secret_revision(state, seq, record, event.at)
    record.versions[revision] = Version(
        revision,
        source.origin,
        source.event_seq,
        source.kind,
        source.sealed,
        event.at,
        source.origin_request,
    )
    return [PutSecretEntry(event.name, revision, source.sealed, source.kind)]


def _destroy(state: ViewState, seq: int, event: SecretDestroyed) -> list[Effect]:
    # The event lists what was destroyed; a refold no longer holds the erased puts, so
    # the record alone would under-report. Only this secret's (or erased) revisions count.
    record = state.secrets.get(event.name)
    owned = set(record.revisions) if record is not None else set()
    erase = [r for r in event.versions if r in owned or r in state.erased_revisions]
    if record is not None:
        if event.all:
            erase += record.revisions
            del state.secrets[event.name]
        else:
            # A destroyed revision stops being one of the secret's, exactly as a refold of
            # the erased log never sees it; a secret with none left is gone.
            shredded = set(event.versions)
            record.revisions = [r for r in record.revisions if r not in shredded]
            for revision in shredded:
                record.versions.pop(revision, None)
                record.markers.discard(revision)
            record.updated_at = event.at
            if not record.revisions:
                del state.secrets[event.name]
    erase = sorted(set(erase))
    effects: list[Effect] = []
    state.destroyed[seq] = tuple(sorted(erase))
    if erase:
        effects.append(EraseSecretRevisions(tuple(sorted(erase))))
    if event.erased_seqs:
        effects.append(EraseEvents(tuple(sorted(event.erased_seqs))))
    return effects


def _skip(state: ViewState, event: RevisionsSkipped) -> list[Effect]:
    """Revisions the original's buckets had lost: counted, written as erased placeholders.

    Like an erased put, each takes its number so every later version keeps the number the
    original gave it, and nothing readable is left at it.
    """
    effects: list[Effect] = []
    for _ in range(event.secret_revisions):
        state.secrets_revision += 1
        state.erased_revisions.add(state.secrets_revision)
        effects.append(FillErasedRevision(state.secrets_revision))
    for _ in range(event.state_revisions):
        state.state_revision += 1
        state.last_mapping = ""
        effects.append(FillStateRevision(state.state_revision))
    return effects


def _map(state: ViewState, seq: int, event: MappingAdded | MappingRemoved) -> list[Effect]:
    allowed = state.mappings.setdefault(event.entity, set())
    if isinstance(event, MappingAdded):
        allowed.update(event.secrets)
    else:
        allowed.difference_update(event.secrets)
    state.state_revision += 1
    state.last_mapping = event.entity
    return [PutMappingEntry(event.entity, state.state_revision, tuple(sorted(allowed)))]


# --- the destroy rule -----------------------------------------------------------------------


def shred_plan(
    record: SecretRecord, version: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What destroying `version` (None: every version) shreds: the versions and the log
    entries holding their bytes, as a `SecretDestroyed` lists them.

    Versions sharing bytes (an undelete's copy and the put it copied) go together:
    shredding one without the other would leave the value readable. Raises
    `SecretNotFound` for what holds no value (a delete marker, a destroyed version).
    """
    if version is None:
        targets = record.live_versions()
        if not targets and not record.revisions:
            raise SecretNotFound(record.name)
        return tuple(record.revisions), tuple(sorted({v.event_seq for v in targets}))
    chosen = record.versions.get(version)
    if chosen is None or chosen.sealed is None:
        raise SecretNotFound(record.name, version)
    sharing = [v for v in record.live_versions() if v.origin == chosen.origin]
    return (
        tuple(sorted(v.revision for v in sharing)),
        (chosen.event_seq,),
    )
