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
import logging
import math
from dataclasses import dataclass

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import api

from events.log import EventLog
from projections.state import (
    Effect,
    EraseEvents,
    EraseSecretRevisions,
    FillErasedRevision,
    MarkSecretDeleted,
    PutMappingEntry,
    PutSecretEntry,
)
from secrets_nats_kv.config import KIND_HEADER, kv_stream
from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats.jetstream import WRONG_LAST_SEQUENCE, convert, erase_message, stream_state

log = logging.getLogger(__name__)

ERASED_PLACEHOLDER_KEY = "_secrets-nats-kv_erased"
EVENT_SEQ_HEADER = "Secrets-Event-Seq"


@dataclass(frozen=True, slots=True)
class KvLayout:
    """Names and limits of the two buckets (PROTOCOL.md §6)."""

    secrets_bucket: str
    state_bucket: str
    max_history: int = 64
    replicas: int = 1


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, object] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class KvViews:
    """Create, inspect and write the two KV buckets."""

    def __init__(self, nc: NATS, layout: KvLayout, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._timeout = timeout
        self.layout = layout

    async def ensure(self) -> None:
        await self._ensure_bucket(
            self.layout.secrets_bucket, self.layout.max_history, "secrets-nats-kv secrets"
        )
        await self._ensure_bucket(self.layout.state_bucket, 1, "secrets-nats-kv mappings")

    async def _ensure_bucket(self, bucket: str, history: int, description: str) -> None:
        name = kv_stream(bucket)
        try:
            info = await self._js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        except nats.errors.Error as exc:
            raise convert("bucket info", exc) from None
        if info is not None:
            if info.config.deny_delete:
                # A bucket made by the KV API: allow message deletes so destroy can erase.
                info.config.deny_delete = False
                try:
                    await self._js.update_stream(info.config)
                except nats.errors.Error as exc:
                    raise convert(f"allow deletes on {name}", exc) from None
            return
        config = api.StreamConfig(
            name=name,
            description=description,
            subjects=[f"$KV.{bucket}.>"],
            storage=api.StorageType.FILE,
            num_replicas=self.layout.replicas,
            max_msgs_per_subject=history,
            discard=api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
            deny_delete=False,
            duplicate_window=120.0,
            compression=api.StoreCompression.S2,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if "already in use" not in str(exc.description or ""):
                raise convert(f"create bucket {bucket}", exc) from None
        except nats.errors.Error as exc:
            raise convert(f"create bucket {bucket}", exc) from None

    async def replicas(self) -> int:
        """The highest replica count of the existing buckets (0 if there are none)."""
        found = 0
        for bucket in (self.layout.secrets_bucket, self.layout.state_bucket):
            try:
                info = await self._js.stream_info(kv_stream(bucket))
            except nats.js.errors.NotFoundError:
                continue
            except nats.errors.Error as exc:
                raise convert("bucket info", exc) from None
            found = max(found, info.config.num_replicas or 1)
        return found

    async def last_revision(self, bucket: str) -> int:
        return (await stream_state(self._nc, kv_stream(bucket), self._timeout)).last_seq

    async def drop(self) -> None:
        """Delete both buckets (for `rebuild`); missing buckets are fine."""
        for bucket in (self.layout.secrets_bucket, self.layout.state_bucket):
            try:
                await self._js.delete_stream(kv_stream(bucket))
            except nats.js.errors.NotFoundError:
                pass
            except nats.errors.Error as exc:
                raise convert(f"drop bucket {bucket}", exc) from None

    # --- writes -----------------------------------------------------------------------

    async def publish_at(
        self, bucket: str, key: str, revision: int, value: bytes, headers: dict[str, str]
    ) -> bool:
        """Write `value` as revision `revision` of `bucket`; False if it was already written."""
        headers = {**headers, "Nats-Expected-Last-Sequence": str(revision - 1)}
        reply = await self._request(f"$KV.{bucket}.{key}", value, headers)
        answer = _ack_decoder.decode(reply)
        if answer.error is None:
            if answer.seq != revision:
                raise StorageError(
                    f"bucket {bucket}", f"wrote revision {answer.seq}, expected {revision}"
                )
            return True
        if answer.error.get("err_code") == WRONG_LAST_SEQUENCE:
            last = await self.last_revision(bucket)
            if last >= revision:
                return False  # another writer got there first
            raise StorageError(
                f"bucket {bucket}",
                f"view is at revision {last}, the log expects {revision - 1}: "
                "run `secrets-nats-kv rebuild`",
            )
        raise StorageError(f"bucket {bucket}", str(answer.error.get("description")))

    async def erase_revision(self, bucket: str, revision: int) -> None:
        await erase_message(self._nc, kv_stream(bucket), revision, self._timeout)

    async def _request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> bytes:
        try:
            msg = await self._nc.request(subject, payload, timeout=self._timeout, headers=headers)
        except nats.errors.Error as exc:
            raise convert(subject, exc) from None
        return msg.data


class KvWriter:
    """Actor: applies the fold's effects to the KV views, in log order, exactly once."""

    def __init__(self, views: KvViews, log_: EventLog) -> None:
        self.views = views
        self._log = log_
        self._send, self._receive = anyio.create_memory_object_stream[tuple[int, list[Effect]]](
            math.inf
        )
        self.applied_seq = 0
        self._secrets_last = 0
        self._state_last = 0
        self._progress = anyio.Event()
        self._queued = 0  # entries submitted and not yet applied
        self.failed: str | None = None

    def close(self) -> None:
        """Close the queue of a writer used offline (`apply` only, never `run`)."""
        self._send.close()
        self._receive.close()

    async def prepare(self) -> None:
        """Read where the buckets are, so a restart skips what is already written."""
        layout = self.views.layout
        self._secrets_last = await self.views.last_revision(layout.secrets_bucket)
        self._state_last = await self.views.last_revision(layout.state_bucket)

    @property
    def written(self) -> bool:
        """Whether `prepare` found either bucket holding revisions."""
        return self._secrets_last > 0 or self._state_last > 0

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
            case PutMappingEntry():
                return effect.revision <= self._state_last
            case _:
                return False

    async def wait_applied(self, seq: int) -> None:
        """Wait until entry `seq` is written; failed writes are retried, callers bound the wait."""
        while self.applied_seq < seq:
            await self._progress.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._send, self._receive:
            async for seq, effects in self._receive:
                for effect in effects:
                    await self._apply_with_retry(effect)
                self._queued -= 1
                self._advance(seq)

    def _advance(self, seq: int) -> None:
        self.applied_seq = seq
        self._progress.set()
        self._progress = anyio.Event()

    async def _apply_with_retry(self, effect: Effect) -> None:
        delay = 0.05
        while True:
            try:
                await self.apply(effect)
                self.failed = None
                return
            except (StorageError, NatsUnavailable) as exc:
                self.failed = str(exc)
                log.warning("KV view write failed, retrying", extra={"error": str(exc)})
                self._progress.set()
                self._progress = anyio.Event()
                await anyio.sleep(delay)  # back off while NATS recovers
                delay = min(delay * 2, 2.0)

    async def apply(self, effect: Effect) -> None:
        """Apply one effect now (offline tools: rebuild, rotation); errors propagate."""
        write = positioned_write(self.views.layout, effect)
        if write is not None:
            await self.views.publish_at(
                write.bucket, write.key, write.revision, write.value, write.headers
            )
        await self.erase(effect)

    async def erase(self, effect: Effect) -> None:
        """The erasures `effect` implies, once its own write (if any) is stored; idempotent."""
        layout = self.views.layout
        match effect:
            case FillErasedRevision(revision):
                await self.views.erase_revision(layout.secrets_bucket, revision)
            case EraseSecretRevisions(revisions):
                for revision in revisions:
                    await self.views.erase_revision(layout.secrets_bucket, revision)
            case EraseEvents(seqs):
                for seq in seqs:
                    await self._log.erase(seq)
            case _:
                pass


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
        return f"$KV.{self.bucket}.{self.key}"


def positioned_write(layout: KvLayout, effect: Effect) -> PositionedWrite | None:
    """The message `effect` writes to a bucket, or None if it only erases."""
    match effect:
        case PutSecretEntry(key, revision, sealed, kind):
            return PositionedWrite(
                layout.secrets_bucket, key, revision, sealed, {KIND_HEADER: kind}
            )
        case MarkSecretDeleted(key, revision):
            return PositionedWrite(
                layout.secrets_bucket, key, revision, b"", {"KV-Operation": "DEL"}
            )
        case FillErasedRevision(revision):  # a placeholder, erased once stored
            return PositionedWrite(layout.secrets_bucket, ERASED_PLACEHOLDER_KEY, revision, b"", {})
        case PutMappingEntry(entity, revision, secrets):
            value = msgspec.json.encode(list(secrets))
            return PositionedWrite(layout.state_bucket, entity, revision, value, {})
        case _:
            return None


def erases(effect: Effect) -> bool:
    """Whether `effect` erases something (after its own write, if it has one)."""
    return isinstance(effect, FillErasedRevision | EraseSecretRevisions | EraseEvents)
