"""The audit log: the event history (and optionally the access log) as JSON Lines.

Each event becomes one object saying what happened, to which secret or entity, at which
revision, caused by which admin key under which request id. Values and ciphertexts are
never written: a record is built field by field, not by dumping the event.
"""

from __future__ import annotations

import datetime
import heapq
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

import anyio
import msgspec
from msgspec.structs import replace
from nats.aio.client import Client as NATS

from events.access import (
    AccessRecord,
    UndecodableAccessRecord,
    access_stream_name,
    access_subject,
    decode_access,
)
from events.anchor import Anchor, Anchored
from events.log import EventLog, LogEntry
from events.types import (
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
    SecretPut,
    SecretUndeleted,
    WritesFenced,
    event_type,
)
from projections.checkpoints import BackendCheckpoint, CheckpointWriter, backend_checkpoint_line
from projections.state import ViewState, fold
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.errors import ConfigError, StorageError
from secrets_nats_kv.nats.jetstream import MSG_ID_HEADER
from secrets_nats_kv.nats.reader import StoredMessage, stream_messages
from secrets_nats_kv.nkeys import SigningKey
from secrets_nats_kv.xkeys import XKey


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
    buckets: list[str] | None = None  # an import's source buckets
    counts: dict[str, int] | None = None  # an import's counts, or the revisions skipped
    lost: list[int] | None = None
    relinked: list[int] | None = None
    dropped: list[tuple[int, int]] | None = None  # positions a repair removed, as runs
    reason: str | None = None
    rotation: str | None = None  # an online key rotation's run id (its fence and lifting)


class AccessAuditRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    time: str
    type: str
    secret: str
    granted: bool
    version: str | None = None
    entity: str | None = None
    host: str | None = None
    error: str | None = None


Record = AuditRecord | AccessAuditRecord

_encoder = msgspec.json.Encoder()


def _record_time(record: Record) -> str:
    return record.time


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
        case WritesFenced():
            return replace(base, new_key=event.new_key, rotation=event.rotation)
        case FenceLifted():
            return replace(base, rotation=event.rotation, reason=event.reason or None)
        case OriginalImported():
            return replace(
                base, buckets=[event.secrets_bucket, event.state_bucket], counts=_imported(event)
            )
        case RevisionsSkipped():
            counts = {
                "secret_revisions": event.secret_revisions,
                "state_revisions": event.state_revisions,
            }
            return replace(base, counts=counts)
        case LogRepaired():
            return replace(
                base, lost=list(event.lost), relinked=list(event.relinked), reason=event.reason
            )
        case ForeignDropped():
            dropped = list(event.ranges)
            return replace(
                base, dropped=dropped, counts={"dropped": event.count}, reason=event.reason
            )


def _imported(event: OriginalImported) -> dict[str, int]:
    """What an import brought over, in numbers (never a value)."""
    return {
        "secrets": event.secrets,
        "versions": event.versions,
        "deleted": event.deleted,
        "mappings": event.mappings,
        "bytes": event.bytes,
        "entries": event.entries,
        "secrets_revision": event.secrets_revision,
        "state_revision": event.state_revision,
    }


def _moment(entry: LogEntry) -> float:
    event = entry.event
    return entry.time if event is None or isinstance(event, Rejected) else event.at


async def audit_records(
    log_: EventLog,
    *,
    since: Bound | None = None,
    until: Bound | None = None,
    follow: bool = False,
    links: dict[int, str] | None = None,
) -> AsyncIterator[AuditRecord]:
    """The records of the log inside the window (folding from 0 to know revisions).

    `links`: positions whose chain link to note as the log is read (whatever the window),
    for comparing backend checkpoints with the log.
    """
    state = ViewState()
    async for entry in log_.entries(follow=follow):
        if links is not None and entry.seq in links:
            links[entry.seq] = entry.link
        fold(state, entry.seq, entry.event)
        at = _moment(entry)
        if since is not None and since.before(entry.seq, at):
            continue
        if until is not None and until.after(entry.seq, at):
            if follow:
                return
            continue
        yield audit_record(entry, state)


def encode_line(record: Record) -> bytes:
    return _encoder.encode(record) + b"\n"


def access_audit_record(record: AccessRecord) -> AccessAuditRecord:
    return AccessAuditRecord(
        time=iso(record.at),
        type="get",
        secret=record.secret,
        granted=record.granted,
        version=record.version,
        entity=record.entity,
        host=record.host,
        error=record.error,
    )


@dataclass
class AccessCounts:
    """What an export of the access log left out."""

    forged: int = 0  # messages not tagged by the backend's key, or seen before


async def access_records(
    nc: NATS,
    backend_name: str,
    *,
    since: Bound | None,
    until: Bound | None,
    follow: bool,
    barrier: Barrier | None = None,
    counts: AccessCounts | None = None,
) -> AsyncIterator[AccessAuditRecord]:
    """Get decisions from the access log inside a time window (sequence bounds do not apply).

    With `barrier`, only batches the backend tagged are exported, each batch id once;
    the rest are counted in `counts`, never exported as genuine.
    """
    counts = counts if counts is not None else AccessCounts()
    stream = access_stream_name(backend_name)
    seen: set[str] = set()
    try:
        messages = stream_messages(nc, stream, access_subject(backend_name), follow=follow)
        async for message in messages:
            if barrier is not None and not _genuine(barrier, stream, message, seen):
                counts.forged += 1
                continue
            try:
                records = decode_access(message.data)
            except UndecodableAccessRecord:
                counts.forged += 1
                continue
            for record in records:
                if since is not None and since.at is not None and record.at < since.at:
                    continue
                if until is not None and until.at is not None and record.at > until.at:
                    continue
                yield access_audit_record(record)
    except StorageError:
        return  # no access log (run --no-access-log, or never started)


def _genuine(barrier: Barrier, stream: str, message: StoredMessage, seen: set[str]) -> bool:
    headers = message.headers or {}
    batch_id = headers.get(MSG_ID_HEADER, "")
    tag = headers.get(KV_TAG_HEADER)
    if not batch_id or batch_id in seen:
        return False
    if not barrier.verify_kv(stream, batch_id, 0, message.data, tag):
        return False
    seen.add(batch_id)
    return True


async def export_audit(
    nc: NATS,
    backend_name: str,
    out: BinaryIO,
    *,
    since: Bound | None,
    until: Bound | None,
    follow: bool,
    include_access: bool,
    encryption: XKey | None,
    signer: SigningKey | None = None,
    checkpoint_every: int = 1,
    counts: AccessCounts | None = None,
) -> int:
    """Write the audit log as JSON Lines to `out`; return how many records were written.

    With `signer` (AUDIT_SIGNING_SEED) the records are followed by signed checkpoints
    (`projections.checkpoints`) that `audit verify` checks offline. With `encryption`
    (and not following), the backend's own signed anchors come after the records, each
    with the link this log holds at its position now.
    """
    barrier = Barrier(encryption) if encryption is not None else None
    event_log = EventLog(nc, backend_name=backend_name, barrier=barrier)
    checkpoints = CheckpointWriter(signer, every=checkpoint_every) if signer else None
    count = 0
    signed: list[Anchored] = []
    if barrier is not None and not follow:  # the links are only known through the key
        anchor = Anchor(nc, backend_name=backend_name, barrier=barrier)
        found = await _anchor_history(anchor, signer.public_key if signer else None)
        signed = [a for a in found if a.signature]
    links = {a.seq: "" for a in signed}

    def emit(record: Record) -> None:
        nonlocal count
        line = encode_line(record)
        out.write(b"".join(checkpoints.record(line)) if checkpoints else line)
        out.flush()
        count += 1

    gets = access_records(
        nc,
        backend_name,
        since=since,
        until=until,
        follow=follow,
        barrier=barrier,
        counts=counts,
    )
    await _export(event_log, gets if include_access else None, emit, since, until, follow, links)
    for anchored in signed:  # after the records: each with what the log holds there now
        line = backend_checkpoint_line(
            BackendCheckpoint.of(backend_name, anchored, links[anchored.seq], barrier_key(barrier))
        )
        out.write(b"".join(checkpoints.record(line)) if checkpoints else line)
        out.flush()
        count += 1
    if checkpoints is not None:
        out.write(checkpoints.final())
        out.flush()
    return count


async def _export(
    event_log: EventLog,
    gets: AsyncIterator[AccessAuditRecord] | None,
    emit: Callable[[Record], None],
    since: Bound | None,
    until: Bound | None,
    follow: bool,
    links: dict[int, str] | None = None,
) -> None:
    events = audit_records(event_log, since=since, until=until, follow=follow, links=links)
    if gets is None:
        async for record in events:
            emit(record)
        return
    if follow:
        async with anyio.create_task_group() as tg:

            async def pump(
                source: AsyncIterator[AuditRecord] | AsyncIterator[AccessAuditRecord],
            ) -> None:
                async for record in source:
                    emit(record)

            tg.start_soon(pump, events)
            tg.start_soon(pump, gets)
        return
    history: list[Record] = [record async for record in events]
    decisions: list[Record] = [record async for record in gets]
    for item in heapq.merge(history, decisions, key=_record_time):
        emit(item)


def barrier_key(barrier: Barrier | None) -> str:
    return barrier.public_key if barrier is not None else ""


async def _anchor_history(anchor: Anchor, signed_by: str | None) -> list[Anchored]:
    """The kept anchors; none if there is no anchor stream (a log older than anchors)."""
    try:
        return await anchor.history(signed_by)
    except StorageError:
        return []
