"""The event log on a JetStream stream: the backend's single source of truth.

Appends carry `Nats-Msg-Id` (the admin request id: a retried request lands once) and
`Nats-Expected-Last-Sequence`, so each event lands exactly where its command decided it
would, tagged for that position and linked to the entry before it (`events.codec`).
Reads are ordered consumers from a start sequence, judged by `events.chain.ChainReader`:
only verified entries come out; gaps that a destroy names come out as entries without
an event, entries not tagged by our key as `Rejected`, and a broken chain raises
`ChainBroken`. NATS errors become the project's errors before they leave here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from events.chain import ChainReader, Raw, Verified
from events.codec import Encoded, EventCodec
from events.types import (
    LOG_RECORDS,
    Event,
    MappingAdded,
    MappingRemoved,
    OriginalImported,
    Rejected,
    RevisionsSkipped,
    UndecodableEvent,
    decode_event,
)
from secrets_nats_kv import streams
from secrets_nats_kv.barrier import GENESIS, Barrier, digest
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.limits import max_event_size
from secrets_nats_kv.nats.connection import round_trip
from secrets_nats_kv.nats.jetstream import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    MSG_ID_HEADER,
    HeadReader,
    StreamState,
    WrongLastSequence,
    erase_message,
    stream_info,
    stream_state,
)
from secrets_nats_kv.nats.jetstream import to_backend_error as convert
from secrets_nats_kv.nats.last_entries import LastSequenceReader
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.provisioning import (
    ensure_stream,
    update_stream,
)
from secrets_nats_kv.nats.reader import StoredMessage, stream_messages

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 300.0  # covers a request id's whole +-120 s acceptance window, twice


# The log's names as its importers spell them; built in `secrets_nats_kv.streams`.
stream_name = streams.events_stream
subject_prefix = streams.events_subject_prefix


# The subjects under the prefix that anything of ours writes to the log: events
# (`EventLog.subject_for`) and the placeholders `rotate-key` keeps at their positions
# (entries rejected before a rotation, erased fillers). The stream captures only these,
# so a flood on any other subject under the prefix never reaches the log: it costs the
# backend nothing, does not move the head gets wait for, and is not stored.
EVENT_SUBJECT_SUFFIXES = ("secret.>", "mapping.>", "key", "import", "rejected", "erased")


def subject_of(prefix: str, event: Event) -> str:
    """The subject under `prefix` an event is written to (`EventLog.subject_for`)."""
    if isinstance(event, MappingAdded | MappingRemoved):
        return mapping_subject(prefix, event.entity)
    if isinstance(event, LOG_RECORDS):
        return f"{prefix}.{KEY_SUFFIX}"
    if isinstance(event, OriginalImported | RevisionsSkipped):
        return f"{prefix}.{IMPORT_SUFFIX}"
    return secret_subject(prefix, event.name)


KEY_SUFFIX = "key"  # the key's and the log's own records: rotations, fences, repairs
IMPORT_SUFFIX = "import"  # an import's records


def secret_subject(prefix: str, name: str) -> str:
    """Where every event of one secret goes (put, delete, undelete, destroy)."""
    return f"{prefix}.secret.{name}"


def mapping_subject(prefix: str, entity: str) -> str:
    """Where every mapping event of one entity goes."""
    return f"{prefix}.mapping.{entity}"


def stream_subjects(backend_name: str) -> list[str]:
    """The event stream's subjects (a wildcard consumer filter still reads them all)."""
    prefix = subject_prefix(backend_name)
    return [f"{prefix}.{suffix}" for suffix in EVENT_SUBJECT_SUFFIXES]


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool
    link: str = ""  # the new entry's chain link ("" for a duplicate: the first one's stands)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One position of the log: `event` is None where destroy erased the message.

    `digest` is the SHA-256 of the stored body (for an erased entry: as its destroy
    recorded it); `link` is the chain link after this entry ("" if it is not ours).
    """

    seq: int
    time: float
    event: Event | Rejected | None
    digest: str = ""
    link: str = ""


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
        barrier: Barrier | None,
        replicas: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self._nc = self.nc = nc
        self.barrier = barrier
        self.codec = EventCodec(barrier) if barrier is not None else None
        self._js = nc.jetstream(timeout=timeout)
        self._timeout = timeout
        self.backend_name = backend_name
        self.stream = stream_name(backend_name)
        self.prefix = subject_prefix(backend_name)
        self.replicas = replicas

    # --- subjects ---------------------------------------------------------------------

    def subject_for(self, event: Event) -> str:
        return subject_of(self.prefix, event)

    # --- setup ------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the stream if it is missing (file storage, dedupe window, no purge).

        Its largest message follows the server's payload limit (`limits.max_event_size`):
        the biggest put fits, and one junk message costs no more. An existing stream
        with no limit, or a smaller one (the payload limit was raised), is updated; so is
        one that still captures every subject under the prefix (`stream_subjects`).
        """
        max_msg_size = max_event_size(self._nc.max_payload)
        config = api.StreamConfig(
            name=self.stream,
            description="secrets-nats-kv event log (source of truth)",
            subjects=stream_subjects(self.backend_name),
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
        subjects = stream_subjects(self.backend_name)
        if limit is None or limit < 0 or limit < max_msg_size or info.config.subjects != subjects:
            info.config.max_msg_size = max(max_msg_size, limit or 0)
            info.config.subjects = subjects
            await update_stream(self._nc, info.config, self._timeout)

    async def exists(self) -> bool:
        """Whether the stream exists (an absent log explains no bucket entry: `import`)."""
        return await stream_info(self._nc, self.stream, self._timeout) is not None

    # --- writing ----------------------------------------------------------------------

    async def append(
        self,
        event: Event,
        *,
        expected_last_seq: int,
        previous: str,
        msg_id: str | None = None,
    ) -> Appended:
        """Append `event` as entry `expected_last_seq + 1`, following the link `previous`
        (the link of the last entry of ours up to there), or raise `ConcurrentAppend`."""
        encoded = self._codec().encode(event, expected_last_seq + 1, previous)
        headers = {**encoded.headers, EXPECTED_LAST_SEQUENCE_HEADER: str(expected_last_seq)}
        if msg_id:
            headers[MSG_ID_HEADER] = msg_id
        appended = await self.append_raw(self.subject_for(event), encoded.body, headers)
        return Appended(
            appended.seq, appended.duplicate, "" if appended.duplicate else encoded.link
        )

    async def append_batch(
        self, events: list[Event], *, expected_last_seq: int, previous: str
    ) -> str:
        """Append `events` as consecutive entries after `expected_last_seq` (see
        `append_pipelined`); the last one's link."""
        return await self.append_pipelined(
            events, first_seq=expected_last_seq + 1, previous=previous
        )

    def encode(self, event: Event, seq: int, previous: str) -> Encoded:
        """`event` as it would be stored at `seq` (for tools that publish themselves)."""
        return self._codec().encode(event, seq, previous)

    def _codec(self) -> EventCodec:
        if self.codec is None:
            raise StorageError("append", "this log was opened without the encryption key")
        return self.codec

    async def append_pipelined(
        self,
        events: AsyncIterator[Event] | Iterable[Event],
        *,
        first_seq: int,
        previous: str,
        on_sent: Callable[[int], Awaitable[None]] | None = None,
    ) -> str:
        """Append `events` as entries `first_seq`, `first_seq + 1`, … with a window in flight.

        For offline tools that know every position in advance (`import`): each entry is
        encoded through the codec for its position, the first following the link
        `previous` (the entry at `first_seq - 1`) and each next one the entry before it,
        and pinned with `Nats-Expected-Last-Sequence`, so what lands is always a prefix
        of `events` right after `first_seq - 1`, a chain a reader verifies; a taken
        position raises `PositionConflict`. `on_sent(seq)` runs after each publish is
        sent. Returns the last entry's link, once every publish is acknowledged.
        """
        codec = self._codec()
        seq, link = first_seq - 1, previous
        async with PositionedPublisher(self._nc, self.stream, self.prefix) as publisher:

            async def send(event: Event) -> None:
                nonlocal seq, link
                seq += 1
                encoded = codec.encode(event, seq, link)
                link = encoded.link
                await publisher.publish(seq, self.subject_for(event), encoded.body, encoded.headers)
                if on_sent is not None:
                    await on_sent(seq)

            if isinstance(events, AsyncIterator):
                async for event in events:
                    await send(event)
            else:
                for event in events:
                    await send(event)
            await publisher.drain()
        return link

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

    def last_reader(self) -> LastSequenceReader:
        """A reader of the last entry on given subjects (what one get depends on)."""
        return LastSequenceReader(self._nc, self.stream, self._timeout)

    async def entries(
        self, *, from_seq: int = 1, link: str = GENESIS, follow: bool = False
    ) -> AsyncGenerator[LogEntry, None]:
        """Every verified position from `from_seq` (the entry before it has link `link`),
        gaps included; to the head as read now, then on if following.

        Raises `ChainBroken` where the chain breaks (a deleted tail included) and
        `WrongKey` if no entry of the log is tagged by our key. Without a key (audit
        export without `ENCRYPTION_XKEY_SEED`) entries are decoded unverified.
        """
        if self.codec is None:
            async for entry in self._unverified(from_seq):
                yield entry
            return
        reader = ChainReader(self.codec, after=from_seq - 1, link=link)
        head = (await self.state()).last_seq
        expected = from_seq
        async for message in stream_messages(
            self._nc, self.stream, f"{self.prefix}.>", from_seq=from_seq, until=head
        ):
            for entry in _released_by(reader, message, expected):
                yield entry
            expected = message.seq + 1
        for gap in range(expected, head + 1):  # a tail that is gone: at_head judges it
            for verified in reader.push(Raw(gap, 0.0, None)):
                yield _entry(verified)
        for verified in reader.at_head():
            yield _entry(verified)
        if not follow:
            return
        expected = max(expected, head + 1)
        async for message in stream_messages(
            self._nc, self.stream, f"{self.prefix}.>", from_seq=expected, follow=True
        ):
            for entry in _released_by(reader, message, expected):
                yield entry
            if message.pending == 0:
                for verified in reader.at_head():
                    yield _entry(verified)
            expected = message.seq + 1

    async def _unverified(self, from_seq: int) -> AsyncIterator[LogEntry]:
        expected = from_seq
        async for message in stream_messages(
            self._nc, self.stream, f"{self.prefix}.>", from_seq=from_seq
        ):
            for gap in range(expected, message.seq):
                yield LogEntry(gap, message.time, None)
            try:
                event: Event | Rejected = decode_event(message.data)
            except UndecodableEvent:
                event = Rejected(reason="not an event")
            yield LogEntry(message.seq, message.time, event)
            expected = message.seq + 1

    async def entry(self, seq: int) -> LogEntry | None:
        """The one entry at `seq`, read directly (None if there is none there).

        Its entry tag is checked (`Rejected` if not ours for that position); its chain
        link is not: only a read from the start judges the chain (`import` reads its
        record this way, then folds the whole log through `entries`).
        """
        try:
            msg = await self._js.get_msg(self.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.Error as exc:
            raise convert(f"read {self.stream} #{seq}", exc) from None
        stamp = msg.time.timestamp() if msg.time else 0.0
        body = msg.data or b""
        event: Event | Rejected
        if self.codec is not None and not self.codec.authentic(seq, body, msg.headers):
            event = Rejected(reason="not tagged by our key")
        else:
            try:
                event = decode_event(body)
            except UndecodableEvent:
                event = Rejected(reason="not an event")
        return LogEntry(seq, stamp, event, digest(body))

    async def tail(self) -> tuple[int, str]:
        """The last position of the log as read whole now, and the link an entry after it
        must follow (the chain verified on the way: a resumed `import` appends after it)."""
        seq, link = 0, GENESIS
        async for entry in self.entries():
            seq = entry.seq
            if entry.link:
                link = entry.link
        return seq, link

    async def read_all(self) -> list[LogEntry]:
        return [entry async for entry in self.entries()]


def _entry(verified: Verified) -> LogEntry:
    return LogEntry(verified.seq, verified.time, verified.event, verified.digest, verified.link)


def _released_by(reader: ChainReader, message: StoredMessage, expected: int) -> Iterator[LogEntry]:
    """The entries `message` lets the chain reader release: the gaps before it (positions
    from `expected` on that were erased or never written), then the message itself."""
    for gap in range(expected, message.seq):
        for verified in reader.push(Raw(gap, message.time, None)):
            yield _entry(verified)
    for verified in reader.push(Raw(message.seq, message.time, message.data, message.headers)):
        yield _entry(verified)
