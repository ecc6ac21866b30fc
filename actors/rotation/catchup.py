"""The online copy: the live log into staging while backends keep writing to it.

`LiveCopy` copies in passes, each from where the last one ended up to the head as read
when it starts: the first pass reads the whole log with the fast batched reader, later
ones the few entries written meanwhile. Both chains' state lives in one `Resealer`
across passes, so the staged log is one chain however many passes built it.

A destroy written during the copy may name positions already staged (its shredder
erases them from the live log after it appended the event). The staged bytes there
must go too, and the staged chain committed to *their* digests, not to the live ones
the event records: the destroy is staged with those digests replaced (the bytes the
staged chain linked), and the positions are erased from staging after the pass. A
position that was already a gap when it was read stays a filler (the erased form).

Gaps met inside a pass may be named by a destroy the pass has not reached (appended
after the pass read the head): the old chain then holds entries behind the gap, so
`caught_up` is false until a later pass reads the destroy.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from actors.rotation.context import RotationRun
from actors.rotation.copy import replay
from actors.rotation.report import Counts
from actors.rotation.reseal import Converted, Resealer
from events.types import FenceLifted, KeyRotated, SecretDestroyed, WritesFenced
from projections.state import Fence
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import digest
from secrets_nats_kv.nats.jetstream import erase_message
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import RawMessage, read_stream, stream_messages

API_TIMEOUT = 5.0
DESTROY_TAG = b'"secret_destroyed"'  # in every encoded `SecretDestroyed`
KEPT_ENTRIES = 250_000  # staged entries kept in memory for the refill (about 1 KB each)


class LiveCopy:
    """Copies the live log into staging (through `publisher`) pass by pass."""

    def __init__(self, run: RotationRun, publisher: PositionedPublisher, counts: Counts) -> None:
        self._run = run
        self._publisher = publisher
        self._counts = counts
        self.resealer = Resealer(run, counts, publish=True)
        self.head = 0  # the last live position copied
        self.fence: Fence | None = None  # the fence the copied log leaves standing
        self._staged_digests: dict[int, dict[int, str]] = {}  # destroy seq -> staged digests
        self._to_erase: list[int] = []
        # What staging holds, kept for the refill (see `kept`); None once past the cap.
        self._kept: dict[int, RawMessage] | None = {}

    @property
    def kept(self) -> dict[int, RawMessage] | None:
        """Staging's entries by position as written (gaps left out), if within the cap.

        The refill copies them into the live log while writes are fenced; reading them back
        from the staging stream costs most of that time (nats-py parses every header), so a
        fresh run hands them over from memory. Values in it are sealed: nothing plain.
        """
        return self._kept

    @property
    def caught_up(self) -> bool:
        """Every copied position verified under the old key: nothing held behind a gap."""
        return self.resealer.verified_to == self.head

    async def copy_to(self, until: int, phase: str) -> None:
        """Copy positions head+1..until (`until` read as the live head before the call)."""
        run = self._run
        if until <= self.head:
            return
        subjects = f"{run.live_prefix}.>"
        if self.head == 0:
            source = read_stream(run.nc, run.live, subjects)
        else:
            source = _from(run, subjects, self.head + 1, until)
        await replay(
            run,
            self._destroys_looked_up(source),
            until,
            self._convert,
            self._publisher,
            self._counts,
            phase,
            on_gap=self.resealer.gap,
            first_seq=self.head + 1,
        )
        for seq in self._to_erase:  # after the drain in `replay`: the staged bytes are there
            await erase_message(run.nc, run.staging, seq, API_TIMEOUT)
            if self._kept is not None:
                self._kept.pop(seq, None)
        self._to_erase.clear()
        self.head = until

    def _convert(self, raw: RawMessage) -> Converted:
        converted = self.resealer.convert(raw, self._staged_digests.pop(raw.seq, None))
        if self._kept is not None:
            _, body, headers = converted
            self._kept[raw.seq] = RawMessage(raw.seq, body, headers or {})
            if len(self._kept) > KEPT_ENTRIES:
                self._kept = None  # a log this large is read back from staging instead
        event = self.resealer.last_event
        if isinstance(event, WritesFenced):
            self.fence = Fence(event.new_key, event.rotation, raw.seq)
        elif isinstance(event, FenceLifted | KeyRotated):
            self.fence = None
        return converted

    async def _destroys_looked_up(
        self, source: AsyncGenerator[RawMessage, None]
    ) -> AsyncGenerator[RawMessage, None]:
        """`source`, with the staged digests of what each destroy names fetched first."""
        try:
            async for raw in source:
                maybe = DESTROY_TAG in raw.data  # most entries are not: skip the decode
                event = self.resealer.event_of(raw) if maybe else None
                if isinstance(event, SecretDestroyed) and event.erased_seqs:
                    await self._publisher.drain()  # what it names is staged before we look
                    staged = await self._staged_entries(event.erased_seqs, raw.seq)
                    self._staged_digests[raw.seq] = staged
                    self._to_erase.extend(staged)
                yield raw
        finally:
            await source.aclose()

    async def _staged_entries(self, seqs: tuple[int, ...], before: int) -> dict[int, str]:
        """The digests of the staged entries (not fillers, not placeholders) at `seqs`."""
        found: dict[int, str] = {}
        for seq in seqs:
            if seq >= before:
                continue  # a destroy names earlier entries only; anything else stays as is
            staged = await self._run.get(self._run.staging, seq)
            if staged is not None and staged.data and TAG_HEADER in staged.headers:
                found[seq] = digest(staged.data)
        return found


async def _from(
    run: RotationRun, subjects: str, first: int, until: int
) -> AsyncGenerator[RawMessage, None]:
    """The live log's messages first..until, as the copy reads them.

    An ordered consumer ends at the first message at or past `until`; if `until` itself
    is gone (erased), there may be no message at or after `first` at all and it would
    wait forever, so such a range is read position by position. (A destroy that erases
    `until` after this check is itself appended after it, and ends the consumer.)
    """
    if await run.get(run.live, until) is None:
        for seq in range(first, until + 1):
            raw = await run.get(run.live, seq)
            if raw is not None:
                yield raw
        return
    async for message in stream_messages(run.nc, run.live, subjects, from_seq=first, until=until):
        yield RawMessage(message.seq, message.data, dict(message.headers or {}))
