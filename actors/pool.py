"""The responder pool: one queue subscription, many worker tasks, nothing shared but the view.

Every instance of the backend subscribes to `{base}.{version}.{name}.>` in queue group
`{queue_base}.{name}`, so NATS spreads requests over all of them. Inside one process a
fixed set of workers pulls requests from a bounded buffer; a handler that raises gets an
error reply, and the worker goes on. Shutdown stops taking requests, then lets the ones
in flight finish within a time limit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import nats.errors
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from secrets_nats_kv import wire
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import Other, ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """A request as handlers see it: the operation, its argument, headers and payload."""

    operation: str
    argument: str | None
    headers: Mapping[str, str] | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    headers: dict[str, str] | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(slots=True)
class PoolStats:
    requests: int = 0
    errors: int = 0
    dropped_no_reply: int = 0


class ResponderPool:
    """Actor: serves every operation on the backend's subject with `workers` tasks."""

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        handlers: Mapping[str, Handler],
        *,
        workers: int = 64,
        drain_timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._names = names
        self._handlers = handlers
        self._workers = workers
        self._drain_timeout = drain_timeout
        self._prefix_len = len(names.subject_prefix) + 1
        self._sub: Subscription | None = None
        send, receive = anyio.create_memory_object_stream[Msg](max(workers * 4, 64))
        self._send: MemoryObjectSendStream[Msg] = send
        self._receive: MemoryObjectReceiveStream[Msg] = receive
        self.stats = PoolStats()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self._workers):
                tg.start_soon(self._work, self._receive.clone())
            self._receive.close()
            self._sub = await self._nc.subscribe(
                f"{self._names.subject_prefix}.>",
                queue=self._names.queue_group,
                cb=self._enqueue,
                pending_msgs_limit=65536,
            )
            task_status.started()

    async def drain(self) -> None:
        """Stop taking requests; let those in flight finish (bounded by the drain timeout)."""
        with anyio.move_on_after(self._drain_timeout, shield=True):
            if self._sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self._sub.drain()  # type: ignore[no-untyped-call]  # untyped in nats-py
            await self._send.aclose()

    async def _enqueue(self, msg: Msg) -> None:
        # Shutting down: the request times out at the caller, which retries elsewhere.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send(msg)

    async def _work(self, receive: MemoryObjectReceiveStream[Msg]) -> None:
        async with receive:
            async for msg in receive:
                await self._serve(msg)

    async def _serve(self, msg: Msg) -> None:
        if not msg.reply:
            self.stats.dropped_no_reply += 1
            return
        self.stats.requests += 1
        reply = await self.dispatch(msg.subject, msg.headers, msg.data)
        try:
            await self._nc.publish(msg.reply, reply.data, headers=reply.headers)
        except nats.errors.Error as exc:
            log.warning("could not send a reply", extra={"error": type(exc).__name__})

    async def dispatch(
        self, subject: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> Reply:
        rest = subject[self._prefix_len :]
        operation, _, argument = rest.partition(".")
        handler = self._handlers.get(operation)
        if handler is None:
            return Reply(f"unknown operation {operation}".encode())
        request = Request(operation, argument or None, headers, payload)
        try:
            return await handler(request)
        except ProtocolError as exc:
            self.stats.errors += 1
            return Reply(wire.encode_error_response(exc))
        except Exception as exc:  # a bad request must never kill a worker
            self.stats.errors += 1
            log.exception("handler for %s failed", operation)
            return Reply(wire.encode_error_response(Other(f"internal error: {type(exc).__name__}")))
