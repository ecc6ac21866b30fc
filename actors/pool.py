"""The responder pool: many worker tasks behind one queue subscription, sharing only the view.

Every instance of the backend subscribes to `{base}.{version}.{name}.>` in queue group
`{queue_base}.{name}` (the subscription is the micro service's endpoint, see
`actors.service`), so NATS spreads requests over all of them. Inside one process a fixed
set of workers pulls requests from a bounded buffer; a handler that raises gets an error
reply, and the worker goes on. `close` lets the requests already taken finish.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import nats.errors
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

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
class OperationStats:
    requests: int = 0
    errors: int = 0
    total_ns: int = 0


@dataclass(slots=True)
class PoolStats:
    """Per-operation counters, exported through the micro service's STATS."""

    operations: dict[str, OperationStats] = field(default_factory=dict)
    dropped_no_reply: int = 0

    def operation(self, name: str) -> OperationStats:
        stats = self.operations.get(name)
        if stats is None:
            stats = self.operations[name] = OperationStats()
        return stats

    def as_dict(self) -> dict[str, object]:
        return {
            "dropped_no_reply": self.dropped_no_reply,
            "operations": {
                name: {
                    "requests": op.requests,
                    "errors": op.errors,
                    "average_ms": round(op.total_ns / op.requests / 1e6, 3) if op.requests else 0,
                }
                for name, op in sorted(self.operations.items())
            },
        }


class ResponderPool:
    """Actor: serves every operation on the backend's subject with `workers` tasks."""

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        handlers: Mapping[str, Handler],
        *,
        workers: int = 64,
    ) -> None:
        self._nc = nc
        self._names = names
        self._handlers = handlers
        self._workers = workers
        self._prefix_len = len(names.subject_prefix) + 1
        send, receive = anyio.create_memory_object_stream[Msg](max(workers * 4, 64))
        self._send: MemoryObjectSendStream[Msg] = send
        self._receive: MemoryObjectReceiveStream[Msg] = receive
        self.stats = PoolStats()
        self.finished = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until `close()`; they finish the requests already taken."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._workers):
                    tg.start_soon(self._work, self._receive.clone())
                self._receive.close()
                task_status.started()
        finally:
            self.finished.set()

    async def submit(self, msg: Msg) -> None:
        """Hand a request to the workers (waits while the buffer is full: backpressure)."""
        # Closing down: the request times out at the caller, which retries elsewhere.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send(msg)

    async def close(self) -> None:
        """Take no more requests; wait (bounded) until the workers have answered the rest."""
        await self._send.aclose()

    async def _work(self, receive: MemoryObjectReceiveStream[Msg]) -> None:
        async with receive:
            async for msg in receive:
                await self._serve(msg)

    async def _serve(self, msg: Msg) -> None:
        if not msg.reply:
            self.stats.dropped_no_reply += 1
            return
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
        stats = self.stats.operation(operation)
        stats.requests += 1
        started = time.perf_counter_ns()
        try:
            return await handler(request)
        except ProtocolError as exc:
            stats.errors += 1
            return Reply(wire.encode_error_response(exc))
        except Exception as exc:  # a bad request must never kill a worker
            stats.errors += 1
            log.exception("handler for %s failed", operation)
            return Reply(wire.encode_error_response(Other(f"internal error: {type(exc).__name__}")))
        finally:
            stats.total_ns += time.perf_counter_ns() - started
