"""Shredder: a policy that reacts to `SecretDestroyed` by erasing the log entries it names.

`destroy` shreds a value's bytes from the event log itself, not only from the KV view.
The projections only read the log; erasing log messages is this actor's job. The fold
states what a destroy shreds (its `EraseEvents` effect, only ever from a
`SecretDestroyed`); the shredder erases those messages (overwritten, then removed) in
log order and moves its watermark, which a `destroy` waits on before it answers.

Erasing is idempotent (a message already gone is fine), so it is done again on every
start, as the live view folds the log from the beginning: a destroy cut short between
its append and its erase is finished by the next backend that runs.
"""

from __future__ import annotations

import contextlib
import logging
import math

import anyio
from anyio.abc import TaskStatus

from events.log import EventLog
from projections.state import Effect, EraseEvents
from projections.watermark import Watermark
from secrets_nats_kv.errors import NatsUnavailable, StorageError

log = logging.getLogger(__name__)


class Shredder:
    """Actor: erases the log messages every destroy names, in log order, retrying."""

    def __init__(self, log_: EventLog) -> None:
        self._log = log_
        self._send, self._receive = anyio.create_memory_object_stream[tuple[int, tuple[int, ...]]](
            math.inf
        )
        self.applied = Watermark()  # erased up to
        self._queued = 0

    def close(self) -> None:
        """Close the queue of a shredder that never ran (a refused start)."""
        self._send.close()
        self._receive.close()

    def submit(self, seq: int, effects: list[Effect]) -> None:
        """React to one log entry's effects (called by the live view, never blocks)."""
        seqs = tuple(
            s for effect in effects if isinstance(effect, EraseEvents) for s in effect.seqs
        )
        if not seqs and self._queued == 0:
            self.applied.advance(seq)  # nothing to erase and nothing ahead of it
            return
        self._queued += 1
        with contextlib.suppress(anyio.ClosedResourceError):  # stopping: the log still has it
            self._send.send_nowait((seq, seqs))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._send, self._receive:
            async for seq, seqs in self._receive:
                for erased in seqs:
                    await self._erase_with_retry(erased)
                self._queued -= 1
                self.applied.advance(seq)

    async def _erase_with_retry(self, seq: int) -> None:
        delay = 0.05
        while True:
            try:
                await self._log.erase(seq)
                return
            except (StorageError, NatsUnavailable) as exc:
                log.warning(
                    "erasing a destroyed log entry failed, retrying", extra={"error": str(exc)}
                )
                await anyio.sleep(delay)  # back off while NATS recovers
                delay = min(delay * 2, 2.0)
