"""What `import` appends, as a pure function of what it read from the original's buckets.

The fold numbers secrets-bucket revisions by counting the events that write it, so the
plan walks the original's revisions in order and turns each into the one event that
takes that number: a value into `SecretPut` (kind decided by whether the plaintext is
UTF-8, which the reader found out), a `DEL` marker into `SecretDeleted`, a `PURGE`
marker into `SecretDeleted(purged=True)`, and every run of revisions the original no
longer holds (its 64-entry history, a purge) into one `RevisionsSkipped` that counts
them, up to the bucket's last revision so the next put gets the next number. The state
bucket (history 1) is walked the same way into `MappingAdded` with exactly the names it
held. Values stay the sealed bytes the original stored.

The plan is deterministic: the same buckets give the same events and the same digest,
which is how a re-run after a crash knows that the log's prefix is its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from events.types import (
    Event,
    MappingAdded,
    OriginalImported,
    RevisionsSkipped,
    SecretDeleted,
    SecretKind,
    SecretPut,
    encode_event,
)
from secrets_nats_kv.errors import InvalidSecretName, SecretsBackendError
from secrets_nats_kv.naming import validate_secret_name

OPERATION_DELETE = "DEL"
OPERATION_PURGE = "PURGE"
ORIGINAL_REQUEST = "original:"  # request id of an imported entry: this + its revision


class ImportRefused(SecretsBackendError):
    """`import` will not run on what it found; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SecretEntry:
    """One message still in the original's secrets bucket (`kind` only for values)."""

    revision: int
    key: str
    at: float
    operation: str | None = None  # None for a value, else the KV-Operation header
    sealed: bytes = b""
    kind: SecretKind = "string"
    size: int = 0  # plaintext length, for the report


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One message still in the original's state bucket: an entity's names, raw."""

    revision: int
    key: str
    at: float
    operation: str | None = None
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class Counts:
    secrets: int = 0
    versions: int = 0
    deleted: int = 0
    mappings: int = 0
    bytes: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class ImportPlan:
    """The events to append after the `OriginalImported` record, and what they amount to."""

    secrets_bucket: str
    state_bucket: str
    secrets_revision: int
    state_revision: int
    events: list[Event] = field(repr=False)
    counts: Counts
    digest: str

    def record(self, *, at: float, admin_key: str) -> OriginalImported:
        """The record heading the imported history (who ran it, when, how much)."""
        counts = self.counts
        return OriginalImported(
            at=at,
            admin_key=admin_key,
            secrets_bucket=self.secrets_bucket,
            state_bucket=self.state_bucket,
            entries=len(self.events),
            digest=self.digest,
            secrets_revision=self.secrets_revision,
            state_revision=self.state_revision,
            secrets=counts.secrets,
            versions=counts.versions,
            deleted=counts.deleted,
            mappings=counts.mappings,
            bytes=counts.bytes,
        )

    def matches(self, record: OriginalImported) -> bool:
        """Whether `record` heads a log holding (a prefix of) exactly this plan."""
        return record.digest == self.digest and record.entries == len(self.events)


def _request_id(revision: int) -> str:
    """The original's writes were unauthenticated: imported entries name their revision."""
    return f"{ORIGINAL_REQUEST}{revision}"


def _secret_name(key: str, revision: int) -> str:
    try:
        return validate_secret_name(key)
    except InvalidSecretName as exc:
        raise ImportRefused(f"secrets bucket revision {revision}: key {exc}") from None


def _names(entry: StateEntry) -> tuple[str, ...]:
    try:
        names = msgspec.json.decode(entry.value, type=list[str])
    except msgspec.DecodeError:
        raise ImportRefused(
            f"state bucket revision {entry.revision} ({entry.key}) is not a JSON array of names"
        ) from None
    return tuple(_secret_name(name, entry.revision) for name in names)


def _skip(count: int, at: float, *, state: bool = False) -> RevisionsSkipped:
    if state:
        return RevisionsSkipped(at=at, authenticated=False, state_revisions=count)
    return RevisionsSkipped(at=at, authenticated=False, secret_revisions=count)


def plan_import(
    *,
    secrets_bucket: str,
    state_bucket: str,
    secrets: Iterable[SecretEntry],
    secrets_revision: int,
    state: Iterable[StateEntry],
    state_revision: int,
) -> ImportPlan:
    """The events that make the fold reproduce both buckets, revision for revision."""
    events: list[Event] = []
    versions = size = skipped = 0
    newest: dict[str, bool] = {}  # name -> whether its newest entry is a marker
    expected, last_at = 1, 0.0
    for entry in sorted(secrets, key=lambda e: e.revision):
        if entry.revision < expected:
            raise ImportRefused(f"secrets bucket revision {entry.revision} read twice")
        if entry.revision > expected:
            events.append(_skip(entry.revision - expected, entry.at))
            skipped += entry.revision - expected
        name = _secret_name(entry.key, entry.revision)
        request_id = _request_id(entry.revision)
        if entry.operation is None:
            events.append(
                SecretPut(
                    at=entry.at,
                    authenticated=False,
                    request_id=request_id,
                    name=name,
                    sealed=entry.sealed,
                    kind=entry.kind,
                )
            )
            versions += 1
            size += entry.size
        else:
            events.append(
                SecretDeleted(
                    at=entry.at,
                    authenticated=False,
                    request_id=request_id,
                    name=name,
                    purged=entry.operation == OPERATION_PURGE,
                )
            )
        newest[name] = entry.operation is not None
        expected, last_at = entry.revision + 1, entry.at
    if secrets_revision >= expected:
        events.append(_skip(secrets_revision - expected + 1, last_at))
        skipped += secrets_revision - expected + 1

    mappings = pending = 0  # pending: state revisions absent so far (gaps, deleted entries)
    expected, last_at = 1, 0.0
    for item in sorted(state, key=lambda e: e.revision):
        if item.revision < expected:
            raise ImportRefused(f"state bucket revision {item.revision} read twice")
        pending += item.revision - expected
        if item.operation is not None:
            pending += 1  # a deleted mapping grants nothing; its revision stays absent
        else:
            if pending:
                events.append(_skip(pending, item.at, state=True))
                pending = 0
            names = _names(item)
            events.append(
                MappingAdded(
                    at=item.at,
                    authenticated=False,
                    request_id=_request_id(item.revision),
                    entity=item.key,
                    secrets=names,
                )
            )
            mappings += 1
        expected, last_at = item.revision + 1, item.at
    pending += max(0, state_revision - expected + 1)
    if pending:
        events.append(_skip(pending, last_at, state=True))

    counts = Counts(
        secrets=len(newest),
        versions=versions,
        deleted=sum(newest.values()),
        mappings=mappings,
        bytes=size,
        skipped=skipped,
    )
    return ImportPlan(
        secrets_bucket=secrets_bucket,
        state_bucket=state_bucket,
        secrets_revision=secrets_revision,
        state_revision=state_revision,
        events=events,
        counts=counts,
        digest=digest(events),
    )


def digest(events: Iterable[Event]) -> str:
    """SHA-256 over the encoded events, each length-prefixed."""
    hasher = hashlib.sha256()
    for event in events:
        body = encode_event(event)
        hasher.update(len(body).to_bytes(8, "big"))
        hasher.update(body)
    return hasher.hexdigest()
