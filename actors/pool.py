"""The responder pool: a task per request behind one queue subscription, sharing only the view.

Every instance of the backend subscribes to `{base}.{version}.{name}.>` in queue group
`{queue_base}.{name}` (the subscription is the micro service's endpoint, see
`actors.service`), so NATS spreads requests over all of them. Inside one process up to
`concurrency` requests are served at once, each in a task the pool owns (not the CLI's
`--workers`, which counts processes: each has a pool of its own); a handler that
raises gets an error reply, and the pool goes on. `close` lets the requests already
taken finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
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
    """Actor: serves every operation on the backend's subject with up to `concurrency` tasks."""

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int = 64,
    ) -> None:
        self._nc = nc
        self._names = names
        self._handlers = handlers
        self._prefix_len = len(names.subject_prefix) + 1
        # At most `concurrency` requests in flight; further ones wait in NATS's buffer.
        self._slots = anyio.Semaphore(concurrency, fast_acquire=True)
        self._group: TaskGroup | None = None
        self._closing = anyio.Event()
        self.stats = PoolStats()
        self.finished = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own one task per request in flight until `close()`, then wait for them to answer."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                task_status.started()
                await self._closing.wait()
        finally:
            self._group = None
            self.finished.set()

    async def submit(self, msg: Msg) -> None:
        """Serve `msg` in a task of its own (waits for a free slot: backpressure).

        A task per request, not a fixed set of workers behind a buffer: one hand-off
        less per request, and replies written in the same loop turn share a flush.
        """
        group = self._group
        if group is None or self._closing.is_set():
            return  # closing: the request times out at the caller, which retries elsewhere
        await self._slots.acquire()
        group.start_soon(self._serve_in_slot, msg)

    async def close(self) -> None:
        """Take no more requests; `finished` is set once those already taken are answered."""
        self._closing.set()

    async def _serve_in_slot(self, msg: Msg) -> None:
        try:
            await self._serve(msg)
        finally:
            self._slots.release()

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
