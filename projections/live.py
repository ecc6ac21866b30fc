"""The live view: the fold kept current from the event log, in memory, for responders.

It follows the log with an ordered consumer, folds each entry and hands the entry's KV
writes to the KV writer. `wait_fresh` gives read-your-writes across processes: it reads
the log's head *after* the caller arrived (one request shared by everyone waiting, like
Raft's ReadIndex) and waits until the fold has reached it; a get behind the head waits
only for the last entry on the subjects its answer depends on (`projections.freshness`),
so a backlog of junk, or of other secrets' writes, does not hold it.

While the head cannot be read (JetStream electing a stream leader, NATS unreachable) no
write can be acknowledged either, so reads are served from the view as it stands rather
than failing: availability for hosts starting components matters more than the few
writes acknowledged in the instant before the fault.

A broken chain (`events.chain`) is different: the view stops folding at the last
verified entry, reports one incident, and from then on every read and write waiting on
it fails with the break (no secret is served from a log an attacker changed: the
verified prefix may lack a revocation). An operator runs `secrets-nats-kv verify`, then
`repair`, and restarts the backend. A break found while catching up at start-up fails
`run`, so the backend never reports ready.

A log *deleted* under the view (JetStream answers "no such stream") is such a break too,
reported as its own incident: the view does not recreate it (an empty log would be taken
as the truth; the anchor refuses one at start-up for the same reason).

An online key rotation (`WritesFenced`) is followed through a `FenceFollower`: once the
fold holds a fence it says to wait at, the view stops following and stands still (no
head reads, no stall restarts, no "log cut short" break: the rotation deletes, recreates
and refills the stream), serving reads from the state as it stands while the follower
waits for the rotated log; `rebase` then puts a fresh fold of that log in place, and the
view follows on from there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from events.anchor import Anchored
from events.chain import ChainBroken, WrongKey
from events.log import EventLog, LogEntry, subject_of
from events.types import Event, Rejected, SecretPut
from projections.freshness import ForgedAnswers, HeadReads, HeadRound, SubjectReads, depends_on
from projections.state import Effect, ViewState, fold
from projections.watermark import Watermark
from secrets_nats_kv.barrier import GENESIS
from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats.jetstream import StreamNotFound

Report = Callable[[str, str, bool], object]  # (incident kind, detail, blocks writes)
CHAIN_BROKEN = "event-log-chain-broken"
FOREIGN_ENTRIES = "event-log-foreign-entries"
LOG_DELETED = "event-log-deleted"

log = logging.getLogger(__name__)


class FenceFollower(Protocol):
    """What the view asks while an online key rotation fences writes (actors.keyswitch)."""

    def pauses(self, state: ViewState) -> bool:
        """Whether the view must stop following here (a fence it can follow the swap of)."""
        ...

    async def follow(self, view: LiveView) -> None:
        """Wait for the fence to end (lifted on this log, or `view.rebase`d onto the
        rotated one); the view follows its log on from where it then is."""
        ...


class LogDeleted(StorageError):
    """The event log's stream is gone: nothing is served or written until it is restored."""

    def __init__(self, stream: str, folded: int) -> None:
        super().__init__(
            "event log integrity",
            f"the event log {stream} was deleted under this backend (it had folded it to "
            f"#{folded}); restore it from a backup, then `verify` and restart",
        )


class LiveView:
    """Actor: follows the log from sequence 1 and keeps `state` current."""

    def __init__(
        self,
        log_: EventLog,
        *,
        on_effects: Callable[[int, list[Effect]], None] | None = None,
        report: Report | None = None,
        anchored: Anchored | StorageError | None = None,
        on_forged_head: Callable[[str], object] | None = None,
        fences: FenceFollower | None = None,
    ) -> None:
        self._log = log_
        self._fences = fences
        self.paused = False  # standing at a rotation's fence: the log is not followed
        # Where the log stood when last anchored (events.anchor), or why the anchor could
        # not be read (judged after the log itself: a wrong key is the likelier news).
        self._anchor_error = anchored if isinstance(anchored, StorageError) else None
        self._anchored = anchored if isinstance(anchored, Anchored) else None
        self._on_effects = on_effects
        self._report = report
        self.forged = ForgedAnswers(on_forged_head)  # strangers answering our $JS.API reads
        self._heads = HeadReads(
            lambda: log_.head_reader(), self.forged, lambda: self.state.last_seq
        )
        self.subject_reads = SubjectReads(lambda: log_.last_reader(), self.forged)
        # The last entry of ours folded on each subject (what a get's answer depends on).
        self.subject_seq: dict[str, int] = {}
        self.state = ViewState()
        self.link = GENESIS  # the chain link of the last entry of ours folded
        self.digests: dict[int, str] = {}  # put entry -> digest of its bytes (for destroy)
        self.broken: StorageError | None = None  # a chain break: nothing past it is served
        self.foreign = 0  # entries not tagged by our key, skipped
        self.applied = Watermark()  # folded up to (`state.last_seq`, once listeners have it)
        self._round: HeadRound | None = None
        self._head_wanted = anyio.Event()
        self.ready = anyio.Event()
        self._follow_scope: anyio.CancelScope | None = None
        self.stall_after = 2.0  # seconds without progress behind the head before following again
        self.head_timeout = 3.0  # long enough for a loaded machine, short for an election
        self.stale_reads = 0  # reads served without a head read (the log was unreachable)
        self._last_stale_warning = 0.0

    @property
    def applied_seq(self) -> int:
        return self.applied.at

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Catch up with the log, report started (ready), then follow it and serve head reads."""
        await self.catch_up()
        self.ready.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow)
            tg.start_soon(self._serve_head_reads)
            tg.start_soon(self._watch_follow)
            task_status.started()

    async def catch_up(self) -> None:
        """Fold the whole log to its head, verified, and hold it to its anchor, or raise."""
        await self._read(follow=False)  # the whole log verified to its head, or raise
        if self._anchor_error is not None:
            self._break(self._anchor_error)
            raise self._anchor_error
        anchored = self._anchored
        if anchored is not None and anchored.seq > self.state.last_seq:
            self._break(
                ChainBroken(
                    self.state.last_seq + 1,
                    f"the event log ends at #{self.state.last_seq} but its anchor is at "
                    f"#{anchored.seq}: entries were cut from its end or the log was replaced",
                )
            )
            assert self.broken is not None
            raise self.broken

    async def _follow(self) -> None:
        with contextlib.suppress(ChainBroken, WrongKey):  # reported; the view stops here
            while True:
                fences = self._fences
                if fences is not None and fences.pauses(self.state):
                    self.paused = True
                    try:
                        await fences.follow(self)  # lifted, or rebased: follow on
                    finally:
                        self.paused = False
                await self._read(follow=True)  # returns only once an entry ends at a fence

    def _at_fence(self) -> bool:
        return self._fences is not None and self._fences.pauses(self.state)

    def rebase(self, fresh: LiveView, effects: list[tuple[int, list[Effect]]]) -> None:
        """Serve `fresh`, a verified fold of the rewritten log (same positions, new key).

        `effects`: the fresh fold's KV writes past this view's position (the rotation
        rebuilt the views up to its marker), handed on as if this view had folded them.
        """
        self.state, self.link, self.digests = fresh.state, fresh.link, fresh.digests
        self.subject_seq = fresh.subject_seq
        self._anchored = fresh._anchored
        if self._on_effects is not None:
            for seq, entry_effects in effects:
                self._on_effects(seq, entry_effects)
        self.applied.advance(self.state.last_seq)

    async def _read(self, *, follow: bool) -> None:
        """Fold the log from where the view is: to its head, or on and on if following.

        NATS trouble is retried with a backoff; an integrity failure is reported and
        raised (at start-up it stops `run` before the backend is ready).
        """
        delay = 0.1
        while True:
            with anyio.CancelScope() as scope:
                self._follow_scope = scope
                try:
                    entries = self._log.entries(
                        from_seq=self.state.last_seq + 1, link=self.link, follow=follow
                    )
                    async with contextlib.aclosing(entries):
                        async for entry in entries:
                            self._apply(entry)
                            delay = 0.1
                            if follow and self._at_fence():
                                return
                    if not follow:
                        return
                except (ChainBroken, WrongKey) as exc:
                    self._break(exc)
                    raise
                except (StorageError, NatsUnavailable) as exc:
                    if self.broken is not None:
                        return  # reported (a deleted log): nothing more to follow
                    log.warning("event log read interrupted, resuming", extra={"error": str(exc)})
                    await anyio.sleep(delay)  # back off while NATS recovers
                    delay = min(delay * 2, 2.0)

    def _apply(self, entry: LogEntry) -> None:
        self._note(entry.seq, entry.event, entry.digest, entry.link)
        anchored = self._anchored
        if (
            anchored is not None
            and entry.seq == anchored.seq
            and entry.event is not None
            and self.link != anchored.link
        ):
            raise ChainBroken(
                entry.seq, "the entry is not the one anchored: another log is in its place"
            )
        effects = fold(self.state, entry.seq, entry.event)
        if self._on_effects is not None:
            self._on_effects(entry.seq, effects)
        self.applied.advance(self.state.last_seq)

    def _note(self, seq: int, event: Event | Rejected | None, digest: str, link: str) -> None:
        if link:
            self.link = link
        if isinstance(event, SecretPut):
            self.digests[seq] = digest
        if event is not None and not isinstance(event, Rejected):
            self.subject_seq[subject_of(self._log.prefix, event)] = seq
        elif isinstance(event, Rejected):
            self.foreign += 1
            if self._report is not None:
                detail = f"entries not tagged by our key skipped (latest #{seq})"
                self._report(FOREIGN_ENTRIES, detail, False)

    def _break(self, exc: StorageError, kind: str = CHAIN_BROKEN) -> None:
        self.broken = exc
        if self._report is not None:
            self._report(kind, str(exc), True)
        self.applied.fail(exc)  # every waiter fails with the break

    def _deleted(self) -> None:
        """JetStream says the log's stream does not exist: a break, and following stops.

        Not while paused at a rotation's fence: its swap deletes and refills the log.
        """
        if self.paused:
            return
        if self.broken is None:
            self._break(LogDeleted(self._log.stream, self.state.last_seq), LOG_DELETED)
        if self._follow_scope is not None:
            self._follow_scope.cancel()

    async def _watch_follow(self) -> None:
        """Restart following if the log is ahead and the view has not moved for a while.

        The consumer behind `_follow` lives on one NATS node; if that node dies, the view
        would stall until the client notices. A stalled view behind a known head is the
        symptom, whatever the cause, so that is what this watches.
        """
        seen = self.state.last_seq
        while self.broken is None:
            await anyio.sleep(self.stall_after)  # a periodic check, not a wait for an event
            if self.paused:
                continue  # at a fence: the log is being swapped, not followed
            folded = self.state.last_seq
            try:
                with anyio.fail_after(self.head_timeout):
                    try:
                        head = await self._log.head()
                    except StreamNotFound:  # believed once JetStream's answer agrees
                        head = await self._heads.read()
            except StreamNotFound:
                self._deleted()
                return
            except (StorageError, NatsUnavailable, TimeoutError):
                continue  # JetStream unreachable: nothing to catch up with yet
            self._check_not_behind(head, folded)
            if head > self.state.last_seq == seen and self._follow_scope is not None:
                log.warning(
                    "view stalled behind the event log, following again",
                    extra={"applied": seen, "head": head},
                )
                self._follow_scope.cancel()
            seen = self.state.last_seq

    async def wait_applied(self, seq: int) -> None:
        await self.applied.wait_for(seq)

    async def wait_fresh(
        self, catch_up_within: float, *, secret: str | None = None, entity: str | None = None
    ) -> None:
        """Return once the view includes every event appended before this call (for a get
        of `secret` by `entity`: every one that get's answer depends on).

        Raises TimeoutError if the view has not caught up within `catch_up_within` (the head read
        itself is bounded separately); only a view behind the head pays for that scope.
        """
        if self.broken is not None:
            raise self.broken
        if self.paused:
            return  # at a fence no write is acknowledged: the state as it stands is fresh
        current = self._round
        if current is None:
            current = self._round = HeadRound()
            self._head_wanted.set()
        await current.done.wait()
        if self.broken is not None:
            raise self.broken
        if current.error is not None:
            self._note_stale_read(current.error)
            return
        if self.state.last_seq < current.head:
            target = current.head
            if secret is not None and entity is not None:
                target = await self._narrowed(current.head, secret, entity)
            with anyio.fail_after(catch_up_within):
                await self.wait_applied(target)

    async def _narrowed(self, head: int, secret: str, entity: str) -> int:
        """The part of the log up to `head` a get depends on (`projections.freshness`)."""
        subjects = depends_on(self._log.prefix, secret, entity)
        if subjects is None:
            return head
        try:
            with anyio.fail_after(self.head_timeout):
                target = await self.subject_reads.target(
                    subjects, head, lambda subject: self.subject_seq.get(subject, 0)
                )
        except (StorageError, NatsUnavailable, TimeoutError):
            return head  # cannot tell which part: all of it
        return min(target, head)

    def _note_stale_read(self, error: Exception) -> None:
        self.stale_reads += 1
        now = time.monotonic()
        if now - self._last_stale_warning > 10.0:
            self._last_stale_warning = now
            log.warning(
                "event log head unreadable; serving reads from the view as it stands",
                extra={"error": str(error)},
            )

    async def _serve_head_reads(self) -> None:
        while True:
            await self._head_wanted.wait()
            self._head_wanted = anyio.Event()
            current, self._round = self._round, None
            if current is None:
                continue
            folded = self.state.last_seq
            try:
                with anyio.fail_after(self.head_timeout):
                    current.head = await self._heads.read()
            except StreamNotFound:
                self._deleted()
            except (StorageError, NatsUnavailable, TimeoutError) as exc:
                current.error = exc
            else:
                self._check_not_behind(current.head, folded)
            current.done.set()

    def _check_not_behind(self, head: int, folded: int) -> None:
        """This view is an anchor too: a log whose head, read after the view had folded
        `folded` entries, is below that was cut short or replaced (stream deleted, an
        earlier part published again). The view may fold more while the read is out."""
        if head < folded and self.broken is None and not self.paused:
            self._break(
                ChainBroken(
                    head + 1,
                    f"the event log ends at #{head} but this backend folded it to "
                    f"#{folded}: entries were deleted or the log was replaced",
                )
            )
