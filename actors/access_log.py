"""Access-log actor: records every `get` decision without slowing the get path.

Responders hand decisions over through a bounded buffer and never wait; when the buffer
is full (NATS slower than the gets), records are dropped and counted rather than
delaying a host. Whatever is buffered goes out as one plain publish into the access
stream (split only if it would exceed the server's payload limit).
"""

from __future__ import annotations

import logging

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import api

from events.access import AccessRecord, access_stream_name, access_subject, encode_access
from secrets_nats_kv.nats.jetstream import ensure_stream

log = logging.getLogger(__name__)

_BATCH = 1000


class AccessLog:
    """Actor: owns the access stream and the buffer in front of it."""

    def __init__(
        self, nc: NATS, *, backend_name: str, replicas: int = 1, capacity: int = 10_000
    ) -> None:
        self._nc = nc
        self._stream = access_stream_name(backend_name)
        self._subject = access_subject(backend_name)
        self._replicas = replicas
        self._send, self._receive = anyio.create_memory_object_stream[AccessRecord](capacity)
        self.recorded = 0
        self.dropped = 0

    async def ensure(self) -> None:
        config = api.StreamConfig(
            name=self._stream,
            description="secrets-nats-kv access log (get decisions)",
            subjects=[self._subject],
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            max_age=90 * 24 * 3600.0,
        )
        await ensure_stream(self._nc, config, 5.0)

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

    async def _publish(self, batch: list[AccessRecord]) -> None:
        data = encode_access(batch)
        if len(data) > self._nc.max_payload and len(batch) > 1:
            half = len(batch) // 2
            await self._publish(batch[:half])
            await self._publish(batch[half:])
            return
        try:
            await self._nc.publish(self._subject, data)
        except nats.errors.Error:  # includes a lone record over the payload limit
            self.dropped += len(batch)
        else:
            self.recorded += len(batch)
