"""Appending an event on behalf of a command, and waiting until it is served.

Shared by every command actor: the append (deduplicated by request id, optionally
conditional on the subject's last sequence), then the wait until this process's live
view and KV view include it, so the reply to the admin is an honest `ok`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypedDict

import anyio

from actors.admin import Opened
from actors.health import Health
from events.anchor import Anchor
from events.log import Appended, ConcurrentAppend, EventLog
from events.types import Event
from projections.kv import KvWriter
from projections.live import LiveView
from projections.state import ViewState
from secrets_nats_kv.errors import NatsUnavailable, StorageError, UpstreamError

_ATTEMPTS = 20
log = logging.getLogger(__name__)


class Provenance(TypedDict):
    """The fields every event records about its cause."""

    at: float
    admin_key: str
    authenticated: bool
    request_id: str


class Appender:
    """Append events and wait for them to be visible in this process's views."""

    def __init__(
        self,
        log_: EventLog,
        view: LiveView,
        writer: KvWriter | None,
        *,
        settle_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        health: Health | None = None,
        anchor: Anchor | None = None,
    ) -> None:
        self.log = log_
        self._anchor = anchor
        self._health = health
        self.view = view
        self._writer = writer
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
        if self._health is not None and self._health.writes_blocked:
            raise UpstreamError(
                "writes are refused until an operator resolves an integrity incident "
                "(see `secrets-nats-kv status` and `secrets-nats-kv verify`)"
            )
        for _ in range(_ATTEMPTS):
            # Commands of this process take turns for a position (they would only collide);
            # other processes' commands are settled by the expected-sequence check.
            async with self._turn:
                await self.fresh()
                first = self.view.state.requests.get(request_id) if request_id else None
                if first is not None:  # a replay: answered with what the first one did
                    return Appended(first, duplicate=True)
                expected, previous = self.view.state.last_seq, self.view.link
                event = decide(self.view.state)
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

    async def append_revision(self, decide: Callable[[ViewState], Event], request_id: str) -> int:
        """`append`, for an event that writes the secrets bucket: the revision it became."""
        appended = await self.append(decide, request_id)
        return self.view.state.revision_of_seq[appended.seq]

    async def _settle(self, seq: int) -> None:
        try:
            with anyio.fail_after(self._settle_timeout):
                await self.view.wait_applied(seq)
                if self._writer is not None:
                    await self._writer.wait_applied(seq)
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
            await self._anchor.advance(self.view.state.last_seq, self.view.link)
        except (StorageError, NatsUnavailable) as exc:
            log.warning("could not move the event log's anchor", extra={"error": str(exc)})

    async def fresh(self) -> None:
        """Wait until the view includes every event appended before now."""
        try:
            await self.view.wait_fresh(self._settle_timeout)
        except TimeoutError:
            raise UpstreamError("the backend's view is behind the event log") from None
        except (StorageError, NatsUnavailable) as exc:
            raise UpstreamError(str(exc)) from None
