"""The event log on a JetStream stream: the backend's single source of truth.

Appends carry `Nats-Msg-Id` (the admin request id: a retried request lands once) and
`Nats-Expected-Last-Sequence`, so each event lands exactly where its command decided it
would, and is tagged for that position (see `events.integrity`). Reads are ordered
consumers from a start sequence; gaps in the sequence (messages that `destroy` erased)
are yielded as entries without an event, and events whose tag does not match are
yielded as `Rejected`. NATS errors become the project's errors before they leave here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import api

from events.integrity import TAG_HEADER, EventAuthenticator
from events.types import (
    Event,
    KeyRotated,
    MappingAdded,
    MappingRemoved,
    OriginalImported,
    Rejected,
    RevisionsSkipped,
    UndecodableEvent,
    decode_event,
    encode_event,
)
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.limits import max_event_size
from secrets_nats_kv.nats.connection import round_trip
from secrets_nats_kv.nats.jetstream import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    MSG_ID_HEADER,
    HeadReader,
    StreamState,
    WrongLastSequence,
    ensure_stream,
    erase_message,
    stream_info,
    stream_state,
    update_stream,
)
from secrets_nats_kv.nats.jetstream import to_backend_error as convert
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import StoredMessage, stream_messages

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 300.0  # covers a request id's whole +-120 s acceptance window, twice


def stream_name(backend_name: str) -> str:
    return f"SECRETS_{backend_name}_events"


def subject_prefix(backend_name: str) -> str:
    return f"wasmcloud_secrets_events.{backend_name}"


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One position of the log: `event` is None where destroy erased the message."""

    seq: int
    time: float
    event: Event | Rejected | None


class ConcurrentAppend(StorageError):
    """The log moved on since the command read it: re-read and decide again."""

    def __init__(self, subject: str) -> None:
        super().__init__("append", f"the log changed concurrently ({subject})")


class EventLog:
    """Append to, read and follow `SECRETS_{name}_events`."""

    def __init__(
        self,
        nc: NATS,
        *,
        backend_name: str,
        authenticator: EventAuthenticator | None,
        replicas: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self.authenticator = authenticator
        self._js = nc.jetstream(timeout=timeout)
        self._timeout = timeout
        self.backend_name = backend_name
        self.stream = stream_name(backend_name)
        self.prefix = subject_prefix(backend_name)
        self.replicas = replicas

    # --- subjects ---------------------------------------------------------------------

    def subject_for(self, event: Event) -> str:
        if isinstance(event, MappingAdded | MappingRemoved):
            return f"{self.prefix}.mapping.{event.entity}"
        if isinstance(event, KeyRotated):
            return f"{self.prefix}.key"
        if isinstance(event, OriginalImported | RevisionsSkipped):
            return f"{self.prefix}.import"
        return f"{self.prefix}.secret.{event.name}"

    # --- setup ------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the stream if it is missing (file storage, dedupe window, no purge).

        Its largest message follows the server's payload limit (`limits.max_event_size`):
        the biggest put fits, and one junk message costs no more. An existing stream
        with no limit, or a smaller one (the payload limit was raised), is updated.
        """
        max_msg_size = max_event_size(self._nc.max_payload)
        config = api.StreamConfig(
            name=self.stream,
            description="secrets-nats-kv event log (source of truth)",
            subjects=[f"{self.prefix}.>"],
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=max_msg_size,
        )
        info = await ensure_stream(self._nc, config, self._timeout)
        if info is None:
            return  # created here, with the limit
        limit = info.config.max_msg_size
        if limit is None or limit < 0 or limit < max_msg_size:
            info.config.max_msg_size = max_msg_size
            await update_stream(self._nc, info.config, self._timeout)

    async def exists(self) -> bool:
        """Whether the stream exists (an absent log explains no bucket entry: `import`)."""
        return await stream_info(self._nc, self.stream, self._timeout) is not None

    # --- writing ----------------------------------------------------------------------

    async def append(
        self, event: Event, *, expected_last_seq: int, msg_id: str | None = None
    ) -> Appended:
        """Append `event` as entry `expected_last_seq + 1`, or raise `ConcurrentAppend`."""
        if self.authenticator is None:
            raise StorageError("append", "this log was opened without the encryption key")
        subject = self.subject_for(event)
        body = encode_event(event)
        headers = {
            EXPECTED_LAST_SEQUENCE_HEADER: str(expected_last_seq),
            TAG_HEADER: self.authenticator.tag(expected_last_seq + 1, body),
        }
        if msg_id:
            headers[MSG_ID_HEADER] = msg_id
        return await self.append_raw(subject, body, headers)

    async def append_pipelined(
        self,
        events: AsyncIterator[Event] | Iterable[Event],
        *,
        first_seq: int,
        on_sent: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """Append `events` as entries `first_seq`, `first_seq + 1`, … with a window in flight.

        For offline tools that know every position in advance (`import`): each entry is
        tagged for its position and pinned with `Nats-Expected-Last-Sequence`, so what
        lands is always a prefix of `events` right after `first_seq - 1`; a taken position
        raises `PositionConflict`. `on_sent(seq)` runs after each publish is sent. Returns
        the last sequence written, once every publish is acknowledged.
        """
        if self.authenticator is None:
            raise StorageError("append", "this log was opened without the encryption key")
        seq = first_seq - 1
        async with PositionedPublisher(self._nc, self.stream) as publisher:

            async def send(event: Event) -> None:
                nonlocal seq
                seq += 1
                body = encode_event(event)
                assert self.authenticator is not None
                headers = {TAG_HEADER: self.authenticator.tag(seq, body)}
                await publisher.publish(seq, self.subject_for(event), body, headers)
                if on_sent is not None:
                    await on_sent(seq)

            if isinstance(events, AsyncIterator):
                async for event in events:
                    await send(event)
            else:
                for event in events:
                    await send(event)
            await publisher.drain()
        return seq

    async def flush(self) -> None:
        """Return once the server has received everything this connection sent."""
        await round_trip(self._nc)

    async def append_raw(self, subject: str, body: bytes, headers: dict[str, str]) -> Appended:
        """Publish an already encoded and tagged entry, pinned by its headers."""
        try:
            ack = await self._js.publish(subject, body, stream=self.stream, headers=headers)
        except nats.errors.Error as exc:
            error = convert("append", exc)
            if isinstance(error, WrongLastSequence):
                raise ConcurrentAppend(subject) from None
            raise error from None
        return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def erase(self, seq: int) -> None:
        """Securely erase one message (overwritten, then removed); absent is fine."""
        await erase_message(self._nc, self.stream, seq, self._timeout)

    # --- reading ----------------------------------------------------------------------

    async def state(self) -> StreamState:
        """Message count, first and last sequence, from one STREAM.INFO request."""
        return await stream_state(self._nc, self.stream, self._timeout)

    async def head(self) -> int:
        """The last sequence written to the log (0 when empty)."""
        return (await self.state()).last_seq

    def head_reader(self) -> HeadReader:
        """A reader of the head that notices strangers answering for JetStream."""
        return HeadReader(self._nc, self.stream, self._timeout)

    async def entries(self, *, from_seq: int = 1, follow: bool = False) -> AsyncIterator[LogEntry]:
        """Every position from `from_seq` on, gaps included; stop at the head unless following."""
        expected = from_seq
        async for message in stream_messages(
            self._nc, self.stream, f"{self.prefix}.>", from_seq=from_seq, follow=follow
        ):
            for gap in range(expected, message.seq):
                yield LogEntry(gap, message.time, None)
            yield LogEntry(message.seq, message.time, self._read(message))
            expected = message.seq + 1

    def _read(self, message: StoredMessage) -> Event | Rejected:
        """The event in `message`, or `Rejected` if it is not ours or not tagged for its place."""
        seq, body = message.seq, message.data
        if self.authenticator is not None:
            tag = (message.headers or {}).get(TAG_HEADER)
            if not self.authenticator.verify(seq, body, tag):  # counted by the reader, not logged
                return Rejected(reason="tag does not match its position")
        try:
            return decode_event(body)
        except UndecodableEvent:
            return Rejected(reason="not an event")

    async def entry(self, seq: int) -> LogEntry | None:
        """The one entry at `seq`, read directly (None if there is none there)."""
        try:
            msg = await self._js.get_msg(self.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.Error as exc:
            raise convert(f"read {self.stream} #{seq}", exc) from None
        stamp = msg.time.timestamp() if msg.time else 0.0
        stored = StoredMessage(seq, stamp, msg.data or b"", msg.headers)
        return LogEntry(seq, stamp, self._read(stored))

    async def read_all(self) -> list[LogEntry]:
        return [entry async for entry in self.entries()]
