"""A backend around an online key rotation: starting under the right key, following a swap.

`rotate-key --online` (actors/rotation) copies the live log under the new key while
backends serve, fences writes with a `WritesFenced` in the live log, then swaps: the live
stream is deleted, recreated and refilled from staging, the anchor reset under the new
key, the `KeyRotated` marker written last, right after the fence's position, and then
the KV views rebuilt (with backends writing again: their writers and the rebuild write
each revision once, whoever comes first). A backend holding the new key as its *next*
key (`Barrier`'s keyring) lives through that without an incident:

- `SwapFollower.pauses`: a fence naming the next key stops the live view at the fence.
  Writes are refused by the fence itself (the decider), gets go on from the state as it
  stands (its values open under the old key, which the keyring keeps).
- `SwapFollower.follow` watches the position after the view (woken by the swap's steps,
  `actors.swapwatch`: an entry arriving there, the log recreated). An entry there under the
  current key means the rotation gave up (a `FenceLifted`): the view follows on. The
  marker under the new key, once the anchor verifies under the new key too, means the
  rewritten log is complete: a fresh, verified fold of the rewritten log is taken
  (the fold of committed staging made while the swap refilled the log, `actors.prefold`,
  if it is the log the anchor names; else the live log is folded now), the KV writer
  re-reads where the buckets stand, and then, in one step with nothing awaited, the
  keyring adopts the new key and the view is rebased onto the fresh fold
  (`LiveView.rebase`).
- Until its switch a backend answers from its own state: a write another backend took
  after switching first is served here once this one has switched too (the time to fold
  the log), never a value the new key sealed before this backend holds that state.
- A fence naming a key this backend does not hold is one incident; the view keeps
  following the old log (a lifted fence resumes writes; a swap it cannot read breaks it).
- While a committed swap is under way (`swap_under_way`) the backend's KV writer does
  not recreate a bucket it finds missing: the rotation is rebuilding it.

At start-up, `wait_for_swap` waits (bounded, woken by the same steps and by staging's
deletion) while a committed staging stream says a swap is under way (unless the live log
is whole anyway: still the old one, or the rotated one up to its marker, the anchor on
it), and `adopt_log_key` makes the next key current if the log is under it (a rotation
finished while this backend was down).
"""

from __future__ import annotations

import enum
import logging
import time

import anyio
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS

from actors.health import Health
from actors.prefold import StagedFold
from actors.rotation.context import (
    API_TIMEOUT,
    COMMITTED,
    NEW_KEY_KEY,
    OLD_KEY_KEY,
    STATE_KEY,
    staging_stream_name,
)
from actors.swapwatch import FALLBACK_S, SwapSignals
from events.anchor import Anchor, Anchored, AnchorForged
from events.chain import ChainBroken, WrongKey
from events.log import EventLog, stream_name
from events.types import KeyRotated, UndecodableEvent, decode_event
from projections.kv import KvWriter
from projections.live import LiveView
from projections.state import Effect, Fence, ViewState
from secrets_nats_kv.barrier import CHAIN_HEADER, ENTRY_TAG_HEADER, Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats.jetstream import stream_info
from secrets_nats_kv.nats.reader import get_message

log = logging.getLogger(__name__)

ROTATION_KEY_UNKNOWN = "rotation-to-a-key-not-held"  # a fence naming a key we lack
ROTATED_LOG_UNREADABLE = "rotated-log-unreadable"  # the swapped-in log did not verify
SWAP_WAIT_S = 120.0  # at start-up: how long a committed swap may take to finish
_RETRY_MIN_S = 0.05  # after a failed read while following a swap: the first backoff
_PROBE_ENTRIES = 64  # entries read from the head back to tell which key tags the log


class _Next(enum.Enum):
    EMPTY = "empty"  # nothing at the position yet: wait for an entry there
    WAIT = "wait"  # an entry there that decides nothing yet: look again later
    RESUME = "resume"  # the old log goes on (the fence was lifted): follow it
    SWITCH = "switch"  # the rotated log is complete: fold it and serve it


async def wait_for_swap(
    nc: NATS, names: BackendNames, barrier: Barrier, *, within: float = SWAP_WAIT_S
) -> None:
    """Return once no committed staging stream says the live log is being swapped, or the
    live log is whole anyway: still the old one (the fence, or a run stopped right after
    its commit), or the rotated one up to its marker (the views may still be rebuilt:
    the writer and the rebuild share that). Never "ready" on a half-filled log; a swap
    that does not finish `within` seconds is a one-line refusal.

    Between two looks it waits for the swap's next step (`SwapSignals`): the marker
    arriving at the staged marker's position, the log recreated or deleted, staging
    dropped; at most `FALLBACK_S` if none of them comes (a missed advisory)."""
    staging = staging_stream_name(names.name)
    deadline, said = time.monotonic() + within, False
    async with SwapSignals(nc, names) as signals:
        while (committed := await _committed(nc, staging)) is not None:
            old, new, marker_seq = committed
            if await _whole(nc, names, barrier, old, new) or not barrier.holds(new):
                return  # whole; or rotated to a key not held here: the log's reader refuses it
            if not said:
                said = True
                log.info(
                    "an encryption key rotation is swapping the event log; waiting for it "
                    "to finish",
                    extra={"staging": staging},
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(
                    "event log",
                    f"a key rotation's swap is under way ({staging} is committed) and did not "
                    f"finish within {within:g}s: run `secrets-nats-kv rotate-key` again to "
                    "finish it",
                )
            # The marker's arrival is the step to wait for, unless it is there already
            # (the offline order: the anchor moves after it, then staging is dropped).
            there = await _present(nc, names, marker_seq)
            await signals.changed(None if there else marker_seq, within=min(FALLBACK_S, left))


async def wait_for_swap_end(nc: NATS, names: BackendNames, *, within: float = SWAP_WAIT_S) -> None:
    """Return once no committed staging is left: the swap over, the KV views rebuilt and
    checked (staging is dropped last); a one-line refusal after `within` seconds."""
    staging = staging_stream_name(names.name)
    deadline = time.monotonic() + within
    async with SwapSignals(nc, names) as signals:
        while await _committed(nc, staging) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(
                    "KV views",
                    f"a key rotation is rebuilding them ({staging} is committed) and did not "
                    f"finish within {within:g}s: run `secrets-nats-kv rotate-key` again to "
                    "finish it",
                )
            await signals.changed(None, within=min(FALLBACK_S, left))  # staging dropped


async def _present(nc: NATS, names: BackendNames, seq: int) -> bool:
    try:
        return await get_message(nc, stream_name(names.name), seq) is not None
    except (StorageError, NatsUnavailable):
        return False  # the log is gone mid-swap: its creation is the next step


async def swap_under_way(nc: NATS, names: BackendNames) -> bool:
    """Whether a committed staging stream says a key rotation is still swapping the log."""
    return await _committed(nc, staging_stream_name(names.name)) is not None


async def _committed(nc: NATS, staging: str) -> tuple[str, str, int] | None:
    """(old key, new key, the staged marker's position) of a committed staging stream (a
    swap under way), or None."""
    info = await stream_info(nc, staging, API_TIMEOUT)
    metadata = (info.config.metadata or {}) if info is not None else {}
    if info is None or metadata.get(STATE_KEY) != COMMITTED:
        return None
    return metadata.get(OLD_KEY_KEY, ""), metadata.get(NEW_KEY_KEY, ""), info.state.last_seq


async def _whole(nc: NATS, names: BackendNames, barrier: Barrier, old: str, new: str) -> bool:
    """Whether the live log is whole under a held key: still the old one, or the rotated
    one whose marker the anchor (reset under the new key) points at."""
    if barrier.holds(old) and await log_key(nc, names, barrier) == old:
        return True
    if not barrier.holds(new):
        return False
    anchor = Anchor(nc, backend_name=names.name, barrier=barrier.alone(new))
    try:
        anchored = await anchor.read()
    except AnchorForged:
        return False  # still the old key's anchor: the views are not rebuilt yet
    if anchored is None:
        return False
    return await marker_at(nc, names, barrier, anchored.seq, new)


async def marker_at(nc: NATS, names: BackendNames, barrier: Barrier, seq: int, new: str) -> bool:
    """Whether the live log holds at `seq` the rotation's `KeyRotated` to `new`, tagged by it."""
    raw = await get_message(nc, stream_name(names.name), seq)
    if raw is None or barrier.tagged_by(seq, raw.data, raw.headers.get(ENTRY_TAG_HEADER)) != new:
        return False
    try:
        event = decode_event(raw.data)
    except UndecodableEvent:
        return False
    return isinstance(event, KeyRotated) and event.new_key == new


async def log_key(
    nc: NATS, names: BackendNames, barrier: Barrier, *, probe: int = _PROBE_ENTRIES
) -> str | None:
    """The held key the live log is under, judged from its newest entries of ours, else
    its oldest (junk appended by strangers must not hide it); None for an empty log or
    one none of the `probe` positions at either end is tagged by a held key."""
    stream = stream_name(names.name)
    info = await stream_info(nc, stream, API_TIMEOUT)
    if info is None or info.state.messages == 0:
        return None
    first, last = max(info.state.first_seq, 1), info.state.last_seq
    newest = range(last, max(first, last - probe + 1) - 1, -1)
    oldest = range(first, min(last, first + probe - 1) + 1)
    for seq in (*newest, *oldest):
        raw = await get_message(nc, stream, seq)
        if raw is not None:
            found = barrier.tagged_by(seq, raw.data, raw.headers.get(ENTRY_TAG_HEADER))
            if found is not None:
                return found
    return None


async def adopt_log_key(nc: NATS, names: BackendNames, barrier: Barrier) -> None:
    """A log under the next key (a rotation finished while this backend was down): the
    next key becomes the current one. Under neither, the log's reader refuses later."""
    following = barrier.next_public_key
    if following is None or await log_key(nc, names, barrier) != following:
        return
    old = barrier.public_key
    barrier.adopt(following, keep_old=False)
    log.info(
        "the event log is under the next encryption key: it is the current key now",
        extra={"encryption": following, "was": old},
    )


class SwapFollower:
    """The live view's `FenceFollower`: waits at a fence, then follows the swap."""

    def __init__(
        self,
        nc: NATS,
        *,
        names: BackendNames,
        barrier: Barrier,
        writer: KvWriter | None,
        health: Health,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._names = names
        self._barrier = barrier
        self._writer = writer
        self._health = health
        self._replicas = replicas
        self._stream = stream_name(names.name)
        self._unheld: int | None = None  # the fence seq reported as naming a key we lack
        self.fallback = FALLBACK_S  # the longest wait between two looks without an event
        self.switches = 0
        self.prefolded = 0  # switches that took the fold of staging made during the refill

    # --- FenceFollower ------------------------------------------------------------------

    def pauses(self, state: ViewState) -> bool:
        fence = state.fence
        if fence is None:
            if self._unheld is not None:
                self._unheld = None
                self._health.resolve(ROTATION_KEY_UNKNOWN)
            return False
        if fence.new_key == self._barrier.next_public_key:
            return True
        if self._unheld != fence.seq:
            self._unheld = fence.seq
            self._health.report(
                ROTATION_KEY_UNKNOWN,
                f"a key rotation fenced writes at #{fence.seq} for {fence.new_key}, which this "
                "backend does not hold as its next key: restart it with that key as "
                "NEXT_ENCRYPTION_XKEY_SEED (writes are refused until the rotation ends)",
            )
        return False

    async def follow(self, view: LiveView) -> None:
        fence = view.state.fence
        assert fence is not None
        log.info(
            "writes fenced for an encryption key rotation; following its swap",
            extra={"rotation": fence.rotation, "new_key": fence.new_key, "fence_seq": fence.seq},
        )
        staged = StagedFold(
            self._nc, self._names, self._barrier.alone(fence.new_key), view.state.last_seq
        )
        async with SwapSignals(self._nc, self._names) as signals, anyio.create_task_group() as tg:
            try:
                await self._follow_swap(view, fence, signals, staged, tg)
            finally:
                tg.cancel_scope.cancel()  # a fold of staging still going is not needed now

    async def _follow_swap(
        self,
        view: LiveView,
        fence: Fence,
        signals: SwapSignals,
        staged: StagedFold,
        tg: TaskGroup,
    ) -> None:
        retry = _RETRY_MIN_S
        while True:
            seq = view.state.last_seq + 1
            try:
                if not staged.started and await staged.committed():
                    staged.started = True  # final from now on: fold it during the refill
                    tg.start_soon(staged.run)
                step = await self._look(seq, fence)
                if step is _Next.SWITCH:
                    await self._switch(view, fence, staged)
                    return
            except (ChainBroken, WrongKey, RotatedLogUnreadable) as exc:
                # Only a re-run of the rotation mends it, and that deletes and
                # recreates the log: the advisories wake this.
                self._health.report(ROTATED_LOG_UNREADABLE, str(exc))
                step = _Next.WAIT
            except (StorageError, NatsUnavailable) as exc:
                # A read failed: NATS trouble, the log gone between two reads, or
                # (switching) a KV bucket the rotation's rebuild drops and recreates
                # right after the marker. This role is sent no event for the buckets'
                # return (it has no grant on their advisories): a short backoff, then
                # a fresh look, doubling up to the fallback.
                log.warning("could not read the rotated log yet", extra={"error": str(exc)})
                await anyio.sleep(retry)
                retry = min(retry * 2, self.fallback)
                continue
            if step is _Next.RESUME:
                return
            retry = _RETRY_MIN_S
            # The swap is made by another process: wait for its next step (the entry
            # at `seq` arriving, the log recreated or deleted), or the fallback. With
            # an entry already at `seq` that decided nothing (a marker before its
            # anchor: the offline order) no watched event follows: the fallback only.
            await signals.changed(seq if step is _Next.EMPTY else None, within=self.fallback)

    # --- the steps ----------------------------------------------------------------------

    async def _look(self, seq: int, fence: Fence) -> _Next:
        """What the entry at `seq` (just after the view) says about the rotation."""
        raw = await get_message(self._nc, self._stream, seq)
        if raw is None:
            return _Next.EMPTY  # nothing yet, or the stream is being recreated and refilled
        tag = raw.headers.get(ENTRY_TAG_HEADER)
        under = self._barrier.tagged_by(seq, raw.data, tag)
        if under != fence.new_key:
            # The old log goes on (a lifted fence), or something not ours the view's own
            # reader judges: either way the view follows its log again.
            return _Next.RESUME
        try:
            event = decode_event(raw.data)
        except UndecodableEvent:
            return _Next.WAIT
        if not (isinstance(event, KeyRotated) and event.new_key == fence.new_key):
            return _Next.WAIT
        anchored = await self._anchor_under(fence.new_key)
        if anchored is None or anchored.seq < seq:
            return _Next.WAIT  # the views are still being rebuilt: the anchor moves last
        return _Next.SWITCH

    async def _anchor_under(self, key: str) -> Anchored | None:
        anchor = Anchor(self._nc, backend_name=self._names.name, barrier=self._barrier.alone(key))
        try:
            return await anchor.read()
        except AnchorForged:
            return None  # still the old key's anchor: the swap has not reset it yet

    async def _switch(self, view: LiveView, fence: Fence, staged: StagedFold) -> None:
        """Serve the rotated log under the new key: the fold of committed staging made
        during the refill if it is the log the rotation anchored (`StagedFold.matches`),
        else a fold of the live log beside the served one, made now."""
        new = self._barrier.alone(fence.new_key)
        fresh_log = EventLog(
            self._nc, backend_name=self._names.name, barrier=new, replicas=self._replicas
        )
        anchored = await self._anchor_under(fence.new_key)
        start = view.state.last_seq
        marker = await get_message(self._nc, self._stream, start + 1)
        if staged.started:
            # A fold of a stream that no longer changes ends, unless NATS fails it for
            # good (its reads are retried): bounded, then the live log is folded instead.
            with anyio.move_on_after(SWAP_WAIT_S):
                await staged.done.wait()
        fresh = LiveView(fresh_log, anchored=anchored)
        tail: list[tuple[int, list[Effect]]] = []
        link = marker.headers.get(CHAIN_HEADER, "") if marker is not None else ""
        prefolded = staged.view is not None and staged.matches(anchored, start + 1, link)
        if prefolded and staged.view is not None:
            # The served view takes the staged fold, held to the anchor from here on.
            fresh.state, fresh.link = staged.view.state, staged.view.link
            fresh.digests = staged.view.digests
            tail = staged.tail
        else:

            def keep(seq: int, effects: list[Effect]) -> None:
                if seq > start:  # the rotation rebuilt the views up to its marker
                    tail.append((seq, effects))

            fresh = LiveView(fresh_log, on_effects=keep, anchored=anchored)
            await fresh.catch_up()  # from #1, chain verified, held to the new anchor
        if fresh.state.encryption_key != fence.new_key or fresh.state.last_seq <= start:
            raise RotatedLogUnreadable(
                f"the rewritten log ends at #{fresh.state.last_seq} without the rotation's "
                f"marker for {fence.new_key} after #{start}"
            )
        if self._writer is not None:
            await self._writer.prepare()  # where the rebuilt buckets stand
        # The switch: nothing below awaits, so no request sees half of it.
        self._barrier.adopt(fence.new_key)
        view.rebase(fresh, tail)
        self._health.resolve(ROTATED_LOG_UNREADABLE)
        self.switches += 1
        self.prefolded += prefolded
        log.info(
            "encryption key rotated: serving the rewritten event log under the new key",
            extra={
                "encryption": fence.new_key,
                "events": view.state.last_seq,
                "folded_ahead": prefolded,  # from staging, during the refill
            },
        )


class RotatedLogUnreadable(StorageError):
    """The log swapped in by a rotation does not read as a complete log under its key."""

    def __init__(self, why: str) -> None:
        super().__init__("rotated event log", why)
