"""The event log's interface over a list, and a backend's actors wired over it, no server.

`MemoryEventLog` is what `events.log.EventLog` is to the actors (positional appends with
an expected last sequence, deduplication by message id, ordered reads with gaps where
`erase` took an entry, a followable tail, the head), with each event encoded to its
stored bytes and headers by the real `EventCodec` and read back through the real
`ChainReader`, so the chain is checked here too. `MemoryBackend` wires the real admin actors, the
live view, the shredder and the get responder over it, exactly as `actors.backend`
does minus the KV buckets, and answers requests through the real pool's dispatch, so
the real clients (`AdminClient`, `HostClient`) talk to it in-process. The unit tier
runs the model against it: the actors' rules at thousands of steps a second.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from actors.backend import operation_handlers
from actors.decider import Decider
from actors.gate import AdminGate
from actors.lifecycle import LifecycleActor
from actors.pool import ResponderPool
from actors.responder import GetResponder
from actors.shredder import Shredder
from actors.store import StoreActor
from actors.transit import TransitKeys
from events.chain import ChainReader, Raw, Verified
from events.codec import EventCodec
from events.log import Appended, ConcurrentAppend, LogEntry, subject_of
from events.types import Event, Rejected, UndecodableEvent, decode_event
from projections.live import LiveView
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.limits import DEFAULT_MAX_PAYLOAD
from secrets_nats_kv.nats.last_entries import LastSequences
from secrets_nats_kv.xkeys import XKey


class MemoryEventLog:
    """Stored entries (body, headers) by position; None where `erase` removed an entry."""

    prefix = "memory.events"  # the subjects' prefix, as `EventLog.prefix`

    def __init__(self, barrier: Barrier | None = None) -> None:
        self.codec = EventCodec(barrier or Barrier(XKey.generate()))
        self.stored: list[tuple[bytes, dict[str, str]] | None] = []
        self.subjects: list[str] = []  # the subject of each stored entry, as `EventLog`'s
        self._msg_ids: dict[str, int] = {}
        self._grown = anyio.Event()

    async def append(
        self,
        event: Event,
        *,
        expected_last_seq: int,
        previous: str,
        msg_id: str | None = None,
    ) -> Appended:
        if msg_id and msg_id in self._msg_ids:
            return Appended(seq=self._msg_ids[msg_id], duplicate=True)
        if expected_last_seq != len(self.stored):
            raise ConcurrentAppend(f"expected {expected_last_seq}, head {len(self.stored)}")
        encoded = self.codec.encode(event, expected_last_seq + 1, previous)
        self.stored.append((encoded.body, encoded.headers))
        self.subjects.append(subject_of(self.prefix, event))
        seq = len(self.stored)
        if msg_id:
            self._msg_ids[msg_id] = seq
        self._grown.set()
        self._grown = anyio.Event()
        return Appended(seq=seq, duplicate=False, link=encoded.link)

    async def head(self) -> int:
        return len(self.stored)

    def head_reader(self) -> _HonestHeads:
        """Head reads for the live view: in memory nobody else answers, so one answer each."""
        return _HonestHeads(self)

    def last_reader(self) -> _HonestLast:
        """Last-entry reads by subject for the live view (as `LastSequenceReader`)."""
        return _HonestLast(self)

    def append_junk(self, subject: str, body: bytes = b"junk") -> int:
        """What anyone may publish on the log's subjects: an untagged entry."""
        self.stored.append((body, {}))
        self.subjects.append(subject)
        self._grown.set()
        self._grown = anyio.Event()
        return len(self.stored)

    async def erase(self, seq: int) -> None:
        if 1 <= seq <= len(self.stored):
            self.stored[seq - 1] = None

    def read(self, seq: int) -> Event | Rejected | None:
        """The event stored at `seq`, decoded without checking the chain."""
        stored = self.stored[seq - 1]
        if stored is None:
            return None
        try:
            return decode_event(stored[0])
        except UndecodableEvent:
            return Rejected(reason="not an event")

    def _raw(self, seq: int) -> Raw:
        stored = self.stored[seq - 1]
        return Raw(seq, time.time(), None) if stored is None else Raw(seq, time.time(), *stored)

    async def entries(
        self, *, from_seq: int = 1, link: str = GENESIS, follow: bool = False
    ) -> AsyncGenerator[LogEntry, None]:
        reader = ChainReader(self.codec, after=from_seq - 1, link=link)
        seq = from_seq
        while True:
            released: list[Verified] = []
            while seq <= len(self.stored):
                released += reader.push(self._raw(seq))
                seq += 1
            released += reader.at_head()
            for v in released:
                yield LogEntry(v.seq, v.time, v.event, v.digest, v.link)
            if not follow:
                return
            await self._grown.wait()


@dataclass
class _Reply:
    data: bytes
    headers: dict[str, str] | None


@dataclass
class InProcessConnection:
    """What the clients need of a NATS connection (`request`), answered by a pool."""

    pool: ResponderPool
    max_payload: int = DEFAULT_MAX_PAYLOAD  # what a server's INFO says by default

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 5.0,  # noqa: ASYNC109 (nats-py's signature)
        headers: dict[str, str] | None = None,
    ) -> _Reply:
        with anyio.fail_after(timeout):
            reply = await self.pool.dispatch(subject, headers, payload)
        return _Reply(reply.data, reply.headers)


@dataclass
class MemoryBackend:
    """The actors of one backend over `log`; `async with` runs them."""

    log: MemoryEventLog
    transit: XKey
    encryption: XKey
    names: BackendNames = field(default_factory=BackendNames)
    trusted_issuers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.shredder = Shredder(self.log)  # type: ignore[arg-type]
        self.view = LiveView(self.log, on_effects=self.shredder.submit)  # type: ignore[arg-type]
        gate = AdminGate(self.transit, frozenset({self.transit.public_key}))
        decider = Decider(self.log, self.view, (self.shredder.applied,))  # type: ignore[arg-type]
        barrier = Barrier(self.encryption)
        store = StoreActor(decider, gate, barrier=barrier)
        lifecycle = LifecycleActor(decider, gate)
        responder = GetResponder(
            self.view,
            transit=TransitKeys(self.transit),
            barrier=barrier,
            trusted_issuers=self.trusted_issuers,
        )
        handlers = operation_handlers(responder, store, lifecycle)
        self.pool = ResponderPool(None, self.names, handlers)  # type: ignore[arg-type]
        self.connection: Any = InProcessConnection(self.pool)
        self._group: TaskGroup | None = None

    async def __aenter__(self) -> MemoryBackend:
        self._group = await anyio.create_task_group().__aenter__()
        await self._group.start(self.shredder.run)
        await self._group.start(self.view.run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        return await self._group.__aexit__(*exc_info)


class _HonestHeads:
    """`HeadReader`'s interface over the in-memory log: never an extra (forged) answer."""

    extra_answers = 0

    def __init__(self, log_: MemoryEventLog) -> None:
        self._log = log_

    async def read(self, grace: float = 0.0, at_least: int = 0) -> list[int]:
        return [len(self._log.stored)]


class _HonestLast:
    """`LastSequenceReader`'s interface over the in-memory log: JetStream's answers only."""

    extra_answers = 0

    def __init__(self, log_: MemoryEventLog) -> None:
        self._log = log_

    async def read(self, subjects: tuple[str, ...], grace: float = 0.0) -> LastSequences:
        if len(self._log.subjects) != len(self._log.stored):
            # A test replaced the stored entries: nothing is vouched for.
            return LastSequences(refused="the subjects of the entries are not known")
        seqs: dict[str, int] = {}
        for seq, subject in enumerate(self._log.subjects, 1):
            if self._log.stored[seq - 1] is not None and subject in subjects:
                seqs[subject] = seq
        return LastSequences(seqs)
