"""Deciding an event on a fresh view, appending it at the next position, and waiting
until it is served; and the read path that sees every write acknowledged before it.

Shared by the admin actors. `Decider.append` decides on a view that includes every
event appended before the request, appends the event as the log's very next entry
(`Nats-Expected-Last-Sequence` pins the whole stream's last sequence, not a subject's;
deduplicated by request id), and waits until this process's live view, KV writer and
shredder include it, so the reply to the admin is an honest `ok`. `FreshReads` is the
read path: the live view once it includes everything appended before the read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypedDict

import anyio

from actors.gate import Opened
from actors.health import Health
from events.anchor import Anchor
from events.log import Appended, ConcurrentAppend, EventLog
from events.types import Event
from projections.live import LiveView
from projections.state import ViewState
from projections.watermark import Watermark
from secrets_nats_kv.errors import (
    NatsUnavailable,
    RotationInProgress,
    StorageError,
    UpstreamError,
)

_ATTEMPTS = 20
log = logging.getLogger(__name__)


class Provenance(TypedDict):
    """The fields every event records about its cause."""

    at: float
    admin_key: str
    authenticated: bool
    request_id: str


class FreshReads:
    """The read path: the live view's state, once it includes every earlier append."""

    def __init__(self, view: LiveView, *, timeout: float = 10.0) -> None:
        self._view = view
        self._timeout = timeout

    async def state(self) -> ViewState:
        """The state including every event appended before this call."""
        try:
            await self._view.wait_fresh(self._timeout)
        except TimeoutError:
            raise UpstreamError("the backend's view is behind the event log") from None
        except (StorageError, NatsUnavailable) as exc:
            raise UpstreamError(str(exc)) from None
        return self._view.state

    def current(self) -> ViewState:
        """The state as it stands (after a settled append: includes that append)."""
        return self._view.state

    def digest(self, seq: int) -> str:
        """The SHA-256 of the put stored at `seq`, as the view read it (for destroy)."""
        return self._view.digests.get(seq, "")


class Decider:
    """Decide events on a fresh view, append them positionally, wait until served."""

    def __init__(
        self,
        log_: EventLog,
        view: LiveView,
        settled: Sequence[Watermark] = (),
        *,
        settle_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        health: Health | None = None,
        anchor: Anchor | None = None,
    ) -> None:
        self.log = log_
        self._anchor = anchor
        self._health = health
        self._view = view
        self.reads = FreshReads(view, timeout=settle_timeout)
        self._settled = tuple(settled)
        self._settle_timeout = settle_timeout
        self._turn = anyio.Lock()
        self._clock = clock

    def provenance(self, opened: Opened, request_id: str) -> Provenance:
        return {
            "at": self._clock(),
            "admin_key": opened.sender,
            "authenticated": opened.authenticated,
            "request_id": request_id,
        }

    async def append(self, decide: Callable[[ViewState], Event], request_id: str) -> Appended:
        """Decide the event on a fresh view, append it right after that view, wait until served.

        `decide` may raise a protocol error (the state does not allow the command). If
        another command appends first, the position is taken: decide again on the newer
        view. A retried request id is answered with its first append.
        """
        self._refuse_if_blocked()
        for _ in range(_ATTEMPTS):
            # Commands of this process take turns for a position (they would only collide);
            # other processes' commands are settled by the expected-sequence check.
            async with self._turn:
                state = await self.reads.state()
                first = state.requests.get(request_id) if request_id else None
                if first is not None:  # a replay: answered with what the first one did
                    return Appended(first, duplicate=True)
                if state.fence is not None:  # an online key rotation is swapping the log
                    raise RotationInProgress()
                expected, previous = state.last_seq, self._view.link
                event = decide(state)
                try:
                    appended = await self.log.append(
                        event,
                        expected_last_seq=expected,
                        previous=previous,
                        msg_id=request_id or None,
                    )
                except ConcurrentAppend:
                    continue
                except (StorageError, NatsUnavailable) as exc:
                    raise UpstreamError(str(exc)) from None
            await self._settle(appended.seq)
            await self._advance_anchor()
            return appended
        raise UpstreamError("the log kept changing under this command; try again")

    def _refuse_if_blocked(self) -> None:
        """No write while an incident blocks writes (a bucket ahead of the log, a broken
        chain, a forged anchor): an operator resolves it first."""
        if self._health is None or not self._health.writes_blocked:
            return
        blocking = [i for i in self._health.incidents.values() if i.blocks_writes]
        raise UpstreamError(
            f"writes are refused until an operator resolves an incident: {blocking[0].detail} "
            "(see `secrets-nats-kv status` and `secrets-nats-kv verify`)"
        )

    async def append_revision(self, decide: Callable[[ViewState], Event], request_id: str) -> int:
        """`append`, for an event that writes the secrets bucket: the revision it became."""
        appended = await self.append(decide, request_id)
        return self._view.state.revision_of_seq[appended.seq]

    async def _settle(self, seq: int) -> None:
        try:
            with anyio.fail_after(self._settle_timeout):
                await self._view.wait_applied(seq)
                for watermark in self._settled:
                    await watermark.wait_for(seq)
        except TimeoutError:
            raise UpstreamError("stored, but the views did not catch up in time") from None
        except (StorageError, NatsUnavailable) as exc:
            raise UpstreamError(str(exc)) from None

    async def _advance_anchor(self) -> None:
        """Move the anchor to where this view stands; a failure is only a warning (the
        write is stored; the next one moves it on)."""
        if self._anchor is None:
            return
        try:
            await self._anchor.advance(self._view.state.last_seq, self._view.link)
        except (StorageError, NatsUnavailable) as exc:
            log.warning("could not move the event log's anchor", extra={"error": str(exc)})
