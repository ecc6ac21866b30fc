"""The KV views: the original's `WASMCLOUD_SECRETS` and `SECRETS_{name}_state` buckets.

The writer applies the fold's effects in log order. Each write names the revision the fold
computed through `Nats-Expected-Last-Sequence`, so any number of writers (one per `run`
process) produce every revision exactly once: the loser of a race sees the bucket already
past that revision and moves on. Erasures are idempotent. The KV streams are created
here (not through the KV API) because `destroy` must delete messages, which the KV API's
streams deny.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import api

from projections.foreign import UnexplainedEntries
from projections.state import (
    Effect,
    EraseSecretRevisions,
    FillErasedRevision,
    FillStateRevision,
    MarkSecretDeleted,
    PutMappingEntry,
    PutSecretEntry,
)
from projections.watermark import Watermark
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import KIND_HEADER
from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats.jetstream import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    KV_OPERATION_HEADER,
    WrongLastSequence,
    api_error,
    api_request,
    delete_stream,
    erase_message,
    pub_ack_decoder,
    stored_message,
    stream_info,
    stream_state,
)
from secrets_nats_kv.nats.provisioning import (
    ensure_stream,
    update_stream,
)
from secrets_nats_kv.streams import kv_stream, kv_subject, kv_subjects

log = logging.getLogger(__name__)

ERASED_PLACEHOLDER_KEY = "_secrets-nats-kv_erased"
EVENT_SEQ_HEADER = "Secrets-Event-Seq"
# The incident the writer reports (actors.health) when a revision it must write was taken
# by a writer without this backend's key: the bucket is ahead of the log. One kind, two
# names (the import's and the integrity work's words for it).
KV_FOREIGN_REVISION = "kv-revision-taken-by-a-stranger"
BUCKET_AHEAD = KV_FOREIGN_REVISION


class IncidentSink(Protocol):
    """Where the writer reports trouble an operator must see (`actors.health.Health`)."""

    def report(self, kind: str, detail: str, *, blocks_writes: bool = False) -> bool: ...

    def resolve(self, kind: str) -> None: ...


@dataclass(frozen=True, slots=True)
class KvLayout:
    """Names and limits of the two buckets (PROTOCOL.md §6)."""

    secrets_bucket: str
    state_bucket: str
    max_history: int = 64
    replicas: int = 1


class KvBuckets:
    """Create, inspect and write the two KV buckets."""

    def __init__(self, nc: NATS, layout: KvLayout, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self.layout = layout

    async def ensure(self, metadata: dict[str, str] | None = None) -> None:
        """Create missing buckets (with `metadata` on their streams, for `import`)."""
        await self._ensure_bucket(
            self.layout.secrets_bucket,
            self.layout.max_history,
            "secrets-nats-kv secrets",
            metadata,
        )
        await self._ensure_bucket(self.layout.state_bucket, 1, "secrets-nats-kv mappings", metadata)

    async def _ensure_bucket(
        self, bucket: str, history: int, description: str, metadata: dict[str, str] | None
    ) -> None:
        config = api.StreamConfig(
            name=kv_stream(bucket),
            description=description,
            subjects=[kv_subjects(bucket)],
            storage=api.StorageType.FILE,
            num_replicas=self.layout.replicas,
            max_msgs_per_subject=history,
            discard=api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
            deny_delete=False,
            duplicate_window=120.0,
            compression=api.StoreCompression.S2,
            metadata=metadata,
        )
        info = await ensure_stream(self._nc, config, self._timeout)
        if info is not None and info.config.deny_delete:
            # A bucket made by the KV API: allow message deletes so destroy can erase.
            info.config.deny_delete = False
            await update_stream(self._nc, info.config, self._timeout)

    async def missing(self) -> list[str]:
        """The buckets whose streams are gone (deleted under a running backend)."""
        return [
            bucket
            for bucket in (self.layout.secrets_bucket, self.layout.state_bucket)
            if await stream_info(self._nc, kv_stream(bucket), self._timeout) is None
        ]

    async def replicas(self) -> int:
        """The highest replica count of the existing buckets (0 if there are none)."""
        found = 0
        for bucket in (self.layout.secrets_bucket, self.layout.state_bucket):
            info = await stream_info(self._nc, kv_stream(bucket), self._timeout)
            if info is not None:
                found = max(found, info.config.num_replicas)
        return found

    async def last_revision(self, bucket: str) -> int:
        return (await stream_state(self._nc, kv_stream(bucket), self._timeout)).last_seq

    async def drop(self) -> None:
        """Delete both buckets (for `rebuild`); missing buckets are fine."""
        for bucket in (self.layout.secrets_bucket, self.layout.state_bucket):
            await delete_stream(self._nc, kv_stream(bucket), self._timeout)

    # --- writes -----------------------------------------------------------------------

    async def publish_at(
        self, bucket: str, key: str, revision: int, value: bytes, headers: dict[str, str]
    ) -> bool:
        """Write `value` as revision `revision` of `bucket`; False if it was already written."""
        headers = {**headers, EXPECTED_LAST_SEQUENCE_HEADER: str(revision - 1)}
        reply = await api_request(self._nc, kv_subject(bucket, key), value, self._timeout, headers)
        answer = pub_ack_decoder.decode(reply)
        if answer.error is None:
            if answer.seq != revision:
                raise StorageError(
                    f"bucket {bucket}", f"wrote revision {answer.seq}, expected {revision}"
                )
            return True
        error = api_error(f"bucket {bucket}", answer.error)
        if isinstance(error, WrongLastSequence):
            last = await self.last_revision(bucket)
            if last >= revision:
                return False  # another writer got there first (the caller checks whom)
            raise StorageError(
                f"bucket {bucket}",
                f"view is at revision {last}, the log expects {revision - 1}: "
                "run `secrets-nats-kv rebuild`",
            )
        raise error

    async def stored(self, bucket: str, revision: int) -> api.RawStreamMsg | None:
        """The message at `revision` of `bucket` (subject, headers, data), None if none."""
        return await stored_message(self._nc, kv_stream(bucket), revision, self._timeout)

    async def erase_revision(self, bucket: str, revision: int) -> None:
        await erase_message(self._nc, kv_stream(bucket), revision, self._timeout)


class KvWriter:
    """Actor: applies the fold's effects to the KV views, in log order, exactly once."""

    def __init__(
        self,
        buckets: KvBuckets,
        *,
        barrier: Barrier,
        incidents: IncidentSink | None = None,
        on_missing: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self.buckets = buckets
        self._barrier = barrier  # tags every entry; tells a peer's revision from a stranger's
        self._incidents = incidents
        self._on_missing = on_missing  # refills buckets deleted under us (see Backend)
        self._send, self._receive = anyio.create_memory_object_stream[tuple[int, list[Effect]]](
            math.inf
        )
        self.applied = Watermark()  # written up to
        self._secrets_last = 0
        self._state_last = 0
        self._queued = 0  # entries submitted and not yet applied
        self.failed: str | None = None

    def close(self) -> None:
        """Close the queue of a writer used offline (`apply` only, never `run`)."""
        self._send.close()
        self._receive.close()

    async def prepare(self) -> None:
        """Read where the buckets are, so a restart skips what is already written."""
        layout = self.buckets.layout
        self._secrets_last = await self.buckets.last_revision(layout.secrets_bucket)
        self._state_last = await self.buckets.last_revision(layout.state_bucket)

    def prime(self, secrets_last: int, state_last: int) -> None:
        """`prepare` from bucket heads the caller has read (0 for a bucket not made yet)."""
        self._secrets_last = secrets_last
        self._state_last = state_last

    def submit(self, seq: int, effects: list[Effect]) -> None:
        """Queue one log entry's effects (called by the live view, never blocks)."""
        needed = [e for e in effects if not self.already_written(e)]
        if not needed and self._queued == 0:
            self._advance(seq)  # nothing to write and nothing ahead of it: done already
            return
        self._queued += 1
        with contextlib.suppress(anyio.ClosedResourceError):  # stopping: the log still has it
            self._send.send_nowait((seq, needed))

    def already_written(self, effect: Effect) -> bool:
        """Whether `effect`'s KV message is at or below where `prepare` found the buckets."""
        match effect:
            case PutSecretEntry() | MarkSecretDeleted() | FillErasedRevision():
                return effect.revision <= self._secrets_last
            case PutMappingEntry() | FillStateRevision():
                return effect.revision <= self._state_last
            case _:
                return False

    @property
    def applied_seq(self) -> int:
        return self.applied.at

    async def wait_applied(self, seq: int) -> None:
        """Wait until entry `seq` is written; failed writes are retried, callers bound the wait."""
        await self.applied.wait_for(seq)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._send, self._receive:
            async for seq, effects in self._receive:
                for effect in effects:
                    await self._apply_with_retry(effect)
                self._queued -= 1
                self._advance(seq)

    def _advance(self, seq: int) -> None:
        self.applied.advance(seq)

    async def _apply_with_retry(self, effect: Effect) -> None:
        delay = 0.05
        while True:
            try:
                await self.apply(effect)
                if self.failed is not None and self._incidents is not None:
                    self._incidents.resolve(BUCKET_AHEAD)
                self.failed = None
                return
            except UnexplainedEntries as exc:
                # Never a silent skip: the operator sees it (and writes stop) until the
                # bucket is repaired, then the retry goes through (the health record logs
                # a reported incident once).
                self.failed = str(exc)
                if self._incidents is not None:
                    self._incidents.report(BUCKET_AHEAD, str(exc), blocks_writes=True)
                else:
                    log.error("KV view ahead of the log", extra={"error": str(exc)})
                await anyio.sleep(delay)  # an operator repairs it: poll at the backoff
                delay = min(delay * 2, 2.0)
            except (StorageError, NatsUnavailable) as exc:
                self.failed = str(exc)
                if await self._repaired():
                    continue  # the bucket is back, refilled from the log: write again
                log.warning("KV view write failed, retrying", extra={"error": str(exc)})
                await anyio.sleep(delay)  # back off while NATS recovers
                delay = min(delay * 2, 2.0)

    async def _repaired(self) -> bool:
        """After a failed write: if a bucket is gone, have it recreated and refilled."""
        if self._on_missing is None:
            return False
        try:
            gone = await self.buckets.missing()
            if not gone:
                return False
            await self._on_missing(gone)
            await self.prepare()
        except (StorageError, NatsUnavailable):
            return False
        return True

    async def apply(self, effect: Effect) -> None:
        """Apply one effect now (offline tools: rebuild, rotation); errors propagate."""
        write = positioned_write(self.buckets.layout, effect, self._barrier)
        if write is not None:
            written = await self.buckets.publish_at(
                write.bucket, write.key, write.revision, write.value, write.headers
            )
            if not written:
                await self._check_taken_by_a_peer(write)
        await self.erase(effect)

    async def _check_taken_by_a_peer(self, write: PositionedWrite) -> None:
        """The revision was taken first. By a peer backend (the same key, our tag on it,
        or erased since, as destroy does) is expected; anything else raises
        `UnexplainedEntries`: an incident that blocks writes, never a silent skip."""
        stored = await self.buckets.stored(write.bucket, write.revision)
        if stored is None:
            return  # erased since (a placeholder, or a destroyed version): ours
        headers = stored.headers or {}
        data = stored.data or b""
        tag = headers.get(KV_TAG_HEADER)
        # Either held key: a key rotation's rebuild tags the views under the next key
        # before this backend switches to it.
        if stored.subject == write.subject and self._barrier.kv_tagged_by(
            write.bucket, write.key, write.revision, data, tag
        ):
            return
        raise UnexplainedEntries(
            f"{kv_stream(write.bucket)} revision {write.revision} holds an entry the event "
            "log does not explain, taken by a writer without this backend's key (another "
            "writer, or the original secrets-nats-kv still running?): stop it, then run "
            "`secrets-nats-kv rebuild`"
        )

    async def erase(self, effect: Effect) -> None:
        """The erasures `effect` implies, once its own write (if any) is stored; idempotent."""
        layout = self.buckets.layout
        match effect:
            case FillErasedRevision(revision):
                await self.buckets.erase_revision(layout.secrets_bucket, revision)
            case FillStateRevision(revision):
                await self.buckets.erase_revision(layout.state_bucket, revision)
            case EraseSecretRevisions(revisions):
                for revision in revisions:
                    await self.buckets.erase_revision(layout.secrets_bucket, revision)
            case _:
                pass  # EraseEvents is the shredder's (actors/shredder.py): the log is not ours


@dataclass(frozen=True, slots=True)
class PositionedWrite:
    """The KV message an effect writes: `value` under `key`, at exactly `revision`."""

    bucket: str
    key: str
    revision: int
    value: bytes
    headers: dict[str, str]

    @property
    def subject(self) -> str:
        return kv_subject(self.bucket, self.key)


def positioned_write(
    layout: KvLayout, effect: Effect, barrier: Barrier | None = None
) -> PositionedWrite | None:
    """The message `effect` writes to a bucket, or None if it only erases; tagged over
    (bucket, key, revision, value) by `barrier`, so readers can tell our entries apart."""
    write = _untagged_write(layout, effect)
    if write is None or barrier is None:
        return write
    tag = barrier.kv_tag(write.bucket, write.key, write.revision, write.value)
    return dataclasses.replace(write, headers={**write.headers, KV_TAG_HEADER: tag})


def _untagged_write(layout: KvLayout, effect: Effect) -> PositionedWrite | None:
    match effect:
        case PutSecretEntry(key, revision, sealed, kind):
            return PositionedWrite(
                layout.secrets_bucket, key, revision, sealed, {KIND_HEADER: kind}
            )
        case MarkSecretDeleted(key, revision, operation):
            return PositionedWrite(
                layout.secrets_bucket, key, revision, b"", {KV_OPERATION_HEADER: operation}
            )
        case FillErasedRevision(revision):  # a placeholder, erased once stored
            return PositionedWrite(layout.secrets_bucket, ERASED_PLACEHOLDER_KEY, revision, b"", {})
        case FillStateRevision(revision):
            return PositionedWrite(layout.state_bucket, ERASED_PLACEHOLDER_KEY, revision, b"", {})
        case PutMappingEntry(entity, revision, secrets):
            value = msgspec.json.encode(list(secrets))
            return PositionedWrite(layout.state_bucket, entity, revision, value, {})
        case _:
            return None


def erases(effect: Effect) -> bool:
    """Whether `effect` erases something (after its own write, if it has one)."""
    return isinstance(effect, FillErasedRevision | FillStateRevision | EraseSecretRevisions)
