"""The event log on a JetStream stream: the backend's single source of truth.

Appends carry `Nats-Msg-Id` (the admin request id: a retried request lands once) and
`Nats-Expected-Last-Sequence`, so each event lands exactly where its command decided it
would, and is tagged for that position (see `events.integrity`). Reads are ordered
consumers from a start sequence; gaps in the sequence (messages that `destroy` erased)
are yielded as entries without an event, and events whose tag does not match are
yielded as `Rejected`. NATS errors become the project's errors before they leave here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from events.integrity import TAG_HEADER, EventAuthenticator
from events.types import (
    Event,
    KeyRotated,
    MappingAdded,
    MappingRemoved,
    Rejected,
    UndecodableEvent,
    decode_event,
    encode_event,
)
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.limits import max_event_size
from secrets_nats_kv.nats.jetstream import (
    WRONG_LAST_SEQUENCE,
    HeadReader,
    StreamState,
    convert,
    erase_message,
    stream_state,
)

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
        return f"{self.prefix}.secret.{event.name}"

    def secret_subject(self, name: str) -> str:
        return f"{self.prefix}.secret.{name}"

    # --- setup ------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the stream if it is missing (file storage, dedupe window, no purge).

        Its largest message follows the server's payload limit (`limits.max_event_size`):
        the biggest put fits, and one junk message costs no more. An existing stream
        with no limit, or a smaller one (the payload limit was raised), is updated.
        """
        max_msg_size = max_event_size(self._nc.max_payload)
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            info = None
        except nats.errors.Error as exc:
            raise convert("stream info", exc) from None
        if info is not None:
            limit = info.config.max_msg_size
            if limit is None or limit < 0 or limit < max_msg_size:
                info.config.max_msg_size = max_msg_size
                try:
                    await self._js.update_stream(info.config)
                except nats.errors.Error as exc:
                    raise convert("limit the event log's message size", exc) from None
            return
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
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if "already in use" not in str(exc.description or ""):
                raise convert("create stream", exc) from None
        except nats.errors.Error as exc:
            raise convert("create stream", exc) from None

    async def exists(self) -> bool:
        try:
            await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.Error as exc:
            raise convert("stream info", exc) from None
        return True

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
            api.Header.EXPECTED_LAST_SEQUENCE: str(expected_last_seq),
            TAG_HEADER: self.authenticator.tag(expected_last_seq + 1, body),
        }
        if msg_id:
            headers[api.Header.MSG_ID] = msg_id
        return await self.append_raw(subject, body, headers)

    async def append_raw(self, subject: str, body: bytes, headers: dict[str, str]) -> Appended:
        """Publish an already encoded and tagged entry (used by rotation's copy too)."""
        try:
            ack = await self._js.publish(subject, body, stream=self.stream, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise ConcurrentAppend(subject) from None
            raise convert("append", exc) from None
        except nats.errors.Error as exc:
            raise convert("append", exc) from None
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

    async def read_all(self) -> list[LogEntry]:
        return [entry async for entry in self.entries()]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    time: float
    data: bytes
    headers: dict[str, str] | None


async def stream_messages(
    nc: NATS, stream: str, subject: str, *, from_seq: int = 1, follow: bool = False
) -> AsyncIterator[StoredMessage]:
    """A stream's messages in order from `from_seq`, to its head (or forever if following)."""
    js = nc.jetstream()
    state = await stream_state(nc, stream, 5.0)
    last = state.last_seq
    if not follow and (state.messages == 0 or last < from_seq):
        return
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
    )
    # Messages are handed over by a callback and taken in batches: nats-py's `messages`
    # iterator costs a task and a wait per message, which made reading the log (and
    # catching up after a flood of junk on its subjects) several times slower.
    send, receive = anyio.create_memory_object_stream[Msg](math.inf)

    async def deliver(msg: Msg) -> None:
        send.send_nowait(msg)

    try:
        sub = await js.subscribe(
            subject,
            stream=stream,
            cb=deliver,
            ordered_consumer=True,
            # A lost consumer (its node died) is noticed after two missed heartbeats.
            idle_heartbeat=1.0,
            config=config,
            # No client-side cap: a slow reader (rebuild) must not have messages dropped as
            # a "slow consumer"; the consumer's flow control bounds what is in flight.
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
    except nats.errors.Error as exc:
        raise convert(f"read {stream}", exc) from None
    try:
        with send, receive:
            while True:
                batch = [await receive.receive()]
                with contextlib.suppress(anyio.WouldBlock):
                    while True:
                        batch.append(receive.receive_nowait())
                for msg in batch:
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    if seq < from_seq:
                        continue
                    stamp = meta.timestamp.timestamp() if meta.timestamp else 0.0
                    yield StoredMessage(seq, stamp, msg.data, msg.headers)
                    if not follow and (seq >= last or meta.num_pending == 0):
                        return
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
