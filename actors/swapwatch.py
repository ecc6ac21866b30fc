"""Waking when a key rotation's swap, made by another process, moves a step.

The swap (`actors.rotation.swap`) deletes the live log, recreates it, refills it, resets
the anchor, writes the `KeyRotated` marker and, last, deletes the staging stream. A
backend waiting on it (at start-up, `keyswitch.wait_for_swap`; at a write fence,
`SwapFollower.follow`) looks again at what it needs when JetStream says something moved,
instead of asking every few milliseconds:

- `$JS.EVENT.ADVISORY.STREAM.CREATED.<live log>`: the log was recreated, so a watch on it
  can be opened now;
- `$JS.EVENT.ADVISORY.STREAM.DELETED.<live log>`: the log was deleted, so a watch on it
  is dead (and is closed at once: nats-py would try to recreate its ordered consumer on
  the missing stream and log the failure);
- `$JS.EVENT.ADVISORY.STREAM.DELETED.<staging>`: the swap is over;
- an entry at or after a given position of the live log (an ordered consumer from there,
  on the log's own subjects): the marker, or the entry that lifts a fence.

The anchor's reset raises no event a backend may watch (it may read the anchor, not
follow it); in the online order it comes right before the marker, which does. A missed
advisory (a reconnect, a permission profile from before these grants) costs at most
`FALLBACK_S`: every wait ends then, and the caller looks again. So a wait is bounded
whatever happens, and a watch survives the stream being deleted and recreated: it is
reopened on the new stream after each wake.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from secrets_nats_kv import streams
from secrets_nats_kv.config import BackendNames

FALLBACK_S = 2.0  # the longest a wait lasts without an event: then the caller looks again
# The entry watch's idle heartbeat (an ordered consumer needs one). nats-py recreates an
# ordered consumer after two missed heartbeats; a watch lives at most FALLBACK_S, well
# under that, so a watch on a deleted stream whose advisory was missed is closed first.
_HEARTBEAT_S = 5.0


class SwapSignals:
    """The advisories of one backend's live log and staging stream, held while waiting.

    Held across the caller's looks (`async with`), so an advisory that arrives while the
    caller is looking is not lost: the next `changed` returns at once.
    """

    def __init__(self, nc: NATS, names: BackendNames) -> None:
        self._nc = nc
        self._live = streams.events_stream(names.name)
        self._live_subjects = streams.events_subjects(names.name)
        self._subjects = (
            streams.stream_advisory(streams.STREAM_CREATED, self._live),
            streams.stream_advisory(streams.STREAM_DELETED, self._live),
            streams.stream_advisory(streams.STREAM_DELETED, streams.staging_stream(names.name)),
        )
        self._subscriptions: list[Subscription] = []
        self._moved = anyio.Event()
        self.advisories = 0  # advisories seen (tests: the wake came from an event)

    async def __aenter__(self) -> SwapSignals:
        try:
            for subject in self._subjects:
                self._subscriptions.append(await self._nc.subscribe(subject, cb=self._advised))
        except nats.errors.Error:
            pass  # not subscribed (NATS trouble): the fallback bounds every wait
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            for subscription in self._subscriptions:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()
        self._subscriptions.clear()

    async def _advised(self, msg: Msg) -> None:
        self.advisories += 1
        self._moved.set()

    async def changed(self, entry_at: int | None = None, *, within: float = FALLBACK_S) -> None:
        """Return once the live log or staging was created or deleted since the last call,
        once the live log holds an entry at or after `entry_at` (None: not watched), or
        after `within` seconds, whichever comes first."""
        watch = None
        if not self._moved.is_set() and entry_at is not None:
            watch = await self._watch(entry_at)  # opened in full, never cut off halfway
        try:
            with anyio.move_on_after(within):
                await self._moved.wait()
        finally:
            await self._close(watch)
        if self._moved.is_set():
            self._moved = anyio.Event()  # the caller looks after this: nothing is lost

    async def _watch(self, from_seq: int) -> Subscription | None:
        """An ordered consumer on the live log from `from_seq`; its first message wakes
        `changed`. None if it cannot be opened (the log is gone: its creation wakes)."""

        async def entry(msg: Msg) -> None:
            self._moved.set()

        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
        )
        try:
            return await self._nc.jetstream().subscribe(
                self._live_subjects,
                stream=self._live,
                cb=entry,
                ordered_consumer=True,
                idle_heartbeat=_HEARTBEAT_S,
                config=config,
            )
        except nats.errors.Error:
            return None  # no such stream (mid-swap), or NATS trouble: advisories, fallback

    async def _close(self, watch: Subscription | None) -> None:
        if watch is None:
            return
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2.0),
            contextlib.suppress(nats.errors.Error),
        ):
            await watch.unsubscribe()
