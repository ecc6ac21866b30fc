"""Access-log actor: records every `get` decision without slowing the get path.

Responders hand decisions over through a bounded buffer and never wait; when the buffer
is full (NATS slower than the gets), records are dropped and counted rather than
delaying a host. Whatever is buffered goes out as one plain publish into the access
stream (split only if it would exceed the server's payload limit), with a batch id
(`Nats-Msg-Id`) and a tag over (stream, batch id, body) from the barrier, so `audit
export` can leave out records anyone else published. The stream denies purge.
"""

from __future__ import annotations

import logging
import uuid

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import api

from events.access import AccessRecord, access_stream_name, access_subject, encode_access
from secrets_nats_kv import limits
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.nats.jetstream import (
    MSG_ID_HEADER,
)
from secrets_nats_kv.nats.provisioning import (
    ensure_stream,
    update_stream,
)

log = logging.getLogger(__name__)

_BATCH = 1000


class AccessLog:
    """Actor: owns the access stream and the buffer in front of it."""

    def __init__(
        self,
        nc: NATS,
        *,
        backend_name: str,
        barrier: Barrier | None = None,
        replicas: int = 1,
        capacity: int = 10_000,
        max_bytes: int = limits.ACCESS_LOG_MAX_BYTES,
        max_age_days: int = limits.ACCESS_LOG_MAX_AGE_DAYS,
    ) -> None:
        self._nc = nc
        self._barrier = barrier
        self._max_bytes = max_bytes
        self._max_age = max_age_days * 24 * 3600.0
        self._stream = access_stream_name(backend_name)
        self._subject = access_subject(backend_name)
        self._replicas = replicas
        self._send, self._receive = anyio.create_memory_object_stream[AccessRecord](capacity)
        self.recorded = 0
        self.dropped = 0

    async def ensure(self) -> None:
        """Create the stream, or bring an existing one to the configured limits.

        Oldest records go first once the stream holds `max_bytes` or they are older
        than `max_age_days`: the log of who asked for what never fills a disk.
        """
        config = api.StreamConfig(
            name=self._stream,
            description="secrets-nats-kv access log (get decisions)",
            subjects=[self._subject],
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            max_age=self._max_age,
            max_bytes=self._max_bytes,
            discard=api.DiscardPolicy.OLD,
            deny_purge=True,
        )
        info = await ensure_stream(self._nc, config, 5.0)
        if info is None:
            return  # created here, with the limits
        current = info.config
        wanted = (self._max_bytes, self._max_age, True)
        if (current.max_bytes, current.max_age, current.deny_purge) == wanted:
            return
        # A stream made before these limits, or before purges were denied.
        current.max_bytes, current.max_age, current.deny_purge = wanted
        await update_stream(self._nc, current, 5.0)

    def record(self, record: AccessRecord) -> None:
        """Called on the get path: never blocks, never raises."""
        try:
            self._send.send_nowait(record)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            self.dropped += 1

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._send, self._receive:
            async for record in self._receive:
                # Publish all that is queued before yielding: one flush for the batch.
                batch = [record]
                while len(batch) < _BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._publish(batch)

    def _headers(self, data: bytes) -> dict[str, str] | None:
        if self._barrier is None:
            return None
        batch_id = uuid.uuid4().hex
        tag = self._barrier.kv_tag(self._stream, batch_id, 0, data)
        return {MSG_ID_HEADER: batch_id, KV_TAG_HEADER: tag}

    async def _publish(self, batch: list[AccessRecord]) -> None:
        data = encode_access(batch)
        if len(data) > self._nc.max_payload and len(batch) > 1:
            half = len(batch) // 2
            await self._publish(batch[:half])
            await self._publish(batch[half:])
            return
        try:
            await self._nc.publish(self._subject, data, headers=self._headers(data))
        except nats.errors.Error:  # includes a lone record over the payload limit
            self.dropped += len(batch)
        else:
            self.recorded += len(batch)
