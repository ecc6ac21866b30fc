"""Reading every message still in one of the original's buckets, in revision order.

An ordered consumer from the first sequence to the head as read before it starts, so a
message written meanwhile (an old instance still running) is not half-read: the
importer notices the bucket moved when it checks the head again before replacing it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import stream_state, to_backend_error
from secrets_nats_kv.streams import kv_stream, kv_subject_prefix

KV_OPERATION = "KV-Operation"
_API_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class BucketMessage:
    revision: int
    key: str
    at: float
    operation: str | None  # None for a value (a PUT), else "DEL" / "PURGE"
    data: bytes


@dataclass(frozen=True)
class BucketRead:
    bucket: str
    last_revision: int
    messages: list[BucketMessage]


async def read_bucket(nc: NATS, bucket: str) -> BucketRead:
    """Every message of `bucket` up to its head as read now (a missing bucket is empty)."""
    stream = kv_stream(bucket)
    try:
        state = await stream_state(nc, stream, _API_TIMEOUT)
    except StorageError:
        if not await _exists(nc, stream):
            return BucketRead(bucket, 0, [])
        raise
    messages: list[BucketMessage] = []
    if state.messages == 0:
        return BucketRead(bucket, state.last_seq, messages)
    prefix = kv_subject_prefix(bucket)
    js = nc.jetstream(timeout=_API_TIMEOUT)
    try:
        sub = await js.subscribe(
            f"{prefix}>",
            stream=stream,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
    except nats.errors.Error as exc:
        raise to_backend_error(f"read {stream}", exc) from None
    try:
        async for msg in sub.messages:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq > state.last_seq:
                break
            headers = msg.headers or {}
            messages.append(
                BucketMessage(
                    revision=seq,
                    key=msg.subject.removeprefix(prefix),
                    at=meta.timestamp.timestamp() if meta.timestamp else 0.0,
                    operation=headers.get(KV_OPERATION),
                    data=msg.data or b"",
                )
            )
            if seq >= state.last_seq or meta.num_pending == 0:
                break
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return BucketRead(bucket, state.last_seq, messages)


async def _exists(nc: NATS, stream: str) -> bool:
    try:
        await nc.jetstream(timeout=_API_TIMEOUT).stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    except nats.errors.Error as exc:
        raise to_backend_error(f"stream info {stream}", exc) from None
    return True
