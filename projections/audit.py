"""The audit log: the event history (and optionally the access log) as JSON Lines.

Each event becomes one object saying what happened, to which secret or entity, at which
revision, caused by which admin key under which request id. Values and ciphertexts are
never written: a record is built field by field, not by dumping the event.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from msgspec.structs import replace

from events.log import EventLog, LogEntry
from events.types import (
    KeyRotated,
    MappingAdded,
    MappingRemoved,
    Rejected,
    SecretDeleted,
    SecretDestroyed,
    SecretPut,
    SecretUndeleted,
    event_type,
)
from projections.state import ViewState, fold
from secrets_nats_kv.errors import ConfigError


class AuditRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    seq: int
    time: str
    type: str
    secret: str | None = None
    entity: str | None = None
    revision: int | None = None
    secrets: list[str] | None = None
    versions: list[int] | None = None
    kind: str | None = None
    admin_key: str | None = None
    authenticated: bool | None = None
    request_id: str | None = None
    old_key: str | None = None
    new_key: str | None = None


class AccessAuditRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    time: str
    type: str
    secret: str
    granted: bool
    version: str | None = None
    entity: str | None = None
    host: str | None = None
    error: str | None = None


_encoder = msgspec.json.Encoder()


def iso(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Bound:
    """One end of an export window: a log sequence or a moment."""

    seq: int | None = None
    at: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Bound | None:
        if text is None:
            return None
        if text.isdigit():
            return cls(seq=int(text))
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{text!r} is neither a sequence number nor an ISO time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return cls(at=moment.timestamp())

    def before(self, seq: int, at: float) -> bool:
        """Whether a record at (seq, at) comes before this bound."""
        return seq < self.seq if self.seq is not None else at < (self.at or 0.0)

    def after(self, seq: int, at: float) -> bool:
        return seq > self.seq if self.seq is not None else at > (self.at or 0.0)


def audit_record(entry: LogEntry, state: ViewState) -> AuditRecord:
    """What the audit log says of one log entry (after `state` has folded it)."""
    event = entry.event
    revision = state.revision_of_seq.get(entry.seq)
    if event is None:
        return AuditRecord(seq=entry.seq, time=iso(entry.time), type="erased", revision=revision)
    if isinstance(event, Rejected):
        return AuditRecord(seq=entry.seq, time=iso(entry.time), type="rejected")
    base = AuditRecord(
        seq=entry.seq,
        time=iso(event.at),
        type=event_type(event),
        admin_key=event.admin_key or None,
        authenticated=event.authenticated,
        request_id=event.request_id or None,
    )
    match event:
        case SecretPut():
            return replace(base, secret=event.name, revision=revision, kind=event.kind)
        case SecretDeleted() | SecretUndeleted():
            return replace(base, secret=event.name, revision=revision)
        case SecretDestroyed():
            destroyed = state.destroyed.get(entry.seq, event.versions)
            return replace(base, secret=event.name, versions=list(destroyed))
        case MappingAdded() | MappingRemoved():
            return replace(base, entity=event.entity, secrets=list(event.secrets))
        case KeyRotated():
            return replace(base, old_key=event.old_key, new_key=event.new_key)


def _moment(entry: LogEntry) -> float:
    event = entry.event
    return entry.time if event is None or isinstance(event, Rejected) else event.at


async def audit_records(
    log_: EventLog,
    *,
    since: Bound | None = None,
    until: Bound | None = None,
    follow: bool = False,
) -> AsyncIterator[AuditRecord]:
    """The records of the log inside the window (folding from 0 to know revisions)."""
    state = ViewState()
    async for entry in log_.entries(follow=follow):
        fold(state, entry.seq, entry.event)
        at = _moment(entry)
        if since is not None and since.before(entry.seq, at):
            continue
        if until is not None and until.after(entry.seq, at):
            if follow:
                return
            continue
        yield audit_record(entry, state)


def encode_line(record: AuditRecord | AccessAuditRecord) -> bytes:
    return _encoder.encode(record) + b"\n"
