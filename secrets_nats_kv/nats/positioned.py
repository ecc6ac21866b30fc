"""Writing a stream fast, every message pinned to its position.

Offline tools (`rotate-key`, `rebuild`) write tens of thousands of messages whose
sequences are known in advance. One request per message waits a round trip each; this
keeps a window of publishes in flight instead, each with `Nats-Expected-Last-Sequence`,
and checks every ack.
"""

from __future__ import annotations

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.connection import round_trip
from secrets_nats_kv.nats.jetstream import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    EXPECTED_STREAM_HEADER,
    WrongLastSequence,
    api_error,
    pub_ack_decoder,
    to_backend_error,
)

PUBLISH_WINDOW = 1024
ACK_TIMEOUT = 5.0

# A message's position was taken: another writer got there first (or the stream moved).
PositionConflict = WrongLastSequence


class PositionedPublisher:
    """Pipelined publishes: up to a window in flight, each with `Nats-Expected-Last-Sequence`.

    One connection delivers them in order, so the stream stores them in order; if one
    fails, every later one fails its expected sequence too, and what was written is a
    prefix — never a reordered or shifted stream. A failed expected sequence is raised
    as `PositionConflict` (`WrongLastSequence`), any other failure as a `StorageError`.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        prefix: str = "",
        *,
        window: int = PUBLISH_WINDOW,
        expect_stream: bool = True,
    ) -> None:
        """`expect_stream` also pins the stream by name (a header stored with each message:
        leave it off where messages must look as another writer would have written them)."""
        self._nc = nc
        self.stream = stream
        self._pin = {EXPECTED_STREAM_HEADER: stream} if expect_stream else {}
        self.prefix = prefix  # the stream's subject prefix, for callers that need it
        self._window = window
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._outstanding = 0
        self._moved = anyio.Event()
        self.error: StorageError | None = None

    async def __aenter__(self) -> PositionedPublisher:
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*", cb=self._on_ack, pending_msgs_limit=4 * self._window
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        what = f"write {self.stream} #{seq}"
        try:
            ack = pub_ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            ack = None
        if self.error is None:
            if ack is None:
                self.error = StorageError(what, "unreadable ack")
            elif ack.error is not None:
                self.error = api_error(what, ack.error)
            elif ack.seq != seq:
                self.error = StorageError(f"write {self.stream} #{seq}", f"stored at #{ack.seq}")
        self._outstanding -= 1
        self._moved.set()
        self._moved = anyio.Event()

    async def publish(
        self, seq: int, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Send `body` to land exactly at `seq` (acked later; `drain` checks every ack)."""
        while self._outstanding >= self._window:
            await self._wait_for_acks()
        if self.error is not None:
            raise self.error
        pinned = {**(headers or {}), EXPECTED_LAST_SEQUENCE_HEADER: str(seq - 1), **self._pin}
        self._outstanding += 1
        try:
            await self._nc.publish(subject, body, reply=f"{self._inbox}.{seq}", headers=pinned)
        except nats.errors.Error as exc:
            self._outstanding -= 1
            raise to_backend_error(f"write {self.stream}", exc) from None

    async def _wait_for_acks(self) -> None:
        try:
            with anyio.fail_after(ACK_TIMEOUT):
                await self._moved.wait()
        except TimeoutError:
            raise StorageError(f"write {self.stream}", "acks timed out") from None

    async def drain(self) -> None:
        """Wait until every publish is acknowledged; raise the first failure."""
        while self._outstanding > 0:
            await self._wait_for_acks()
        if self.error is not None:
            raise self.error

    async def flush(self) -> None:
        """Return once the server has every publish sent so far (for crash hooks)."""
        await round_trip(self._nc)
