"""The rewritten log folded from the committed staging stream while the swap refills.

An online rotation fences writes, commits its staging stream, then deletes and refills
the live log from it (the bulk of the fence), resets the anchor and writes the marker.
A backend at the fence used to fold the refilled live log only once the marker was
there, so writes stayed refused for the fence *and* that fold. Committed staging is
final (a committed run never changes or drops it before every backend switched), holds
the same entries at the same positions with the same tags and chain headers, and its
last entry is the marker: so its fold, made during the refill, is the fold of the
rewritten log, and the switch only has to check it against what the rotation anchored.

The check (`matches`): the fold verified every entry under the new key (the chain
reader), ends at the marker's position, and its chain link there is the one the anchor,
reset by the rotation under the new key, records; the live log's marker must carry that
link too. The link chains every entry before it, so equal links mean the same log.
Anything else (a fold that failed, a staging stream for another key, a mismatch) and
the backend folds the live log as before.
"""

from __future__ import annotations

import logging

import anyio
from nats.aio.client import Client as NATS

from actors.rotation.context import (
    API_TIMEOUT,
    COMMITTED,
    NEW_KEY_KEY,
    STATE_KEY,
    staging_stream_name,
    staging_subject_prefix,
)
from events.anchor import Anchored
from events.chain import ChainBroken, WrongKey
from events.log import EventLog
from projections.live import LiveView
from projections.state import Effect
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats.jetstream import stream_info

log = logging.getLogger(__name__)


class StagedFold:
    """One fence's fold of the committed staging stream (for `SwapFollower`)."""

    def __init__(self, nc: NATS, names: BackendNames, new: Barrier, after: int) -> None:
        self._nc = nc
        self._names = names
        self._new = new  # the new key alone: staging is tagged by it
        self._after = after  # the served view's position (the fence)
        self._staging = staging_stream_name(names.name)
        self.started = False
        self.done = anyio.Event()
        self.view: LiveView | None = None  # the fold, once whole and verified
        self.tail: list[tuple[int, list[Effect]]] = []  # its KV effects after `after`

    async def committed(self) -> bool:
        """Whether staging is committed for this fence's key (then it no longer changes)."""
        info = await stream_info(self._nc, self._staging, API_TIMEOUT)
        metadata = (info.config.metadata or {}) if info is not None else {}
        return (
            metadata.get(STATE_KEY) == COMMITTED
            and metadata.get(NEW_KEY_KEY) == self._new.public_key
        )

    async def run(self) -> None:
        """Fold staging whole, verified; on any failure leave `view` unset (the switch then
        folds the live log)."""
        staged = EventLog(self._nc, backend_name=self._names.name, barrier=self._new)
        staged.stream = self._staging  # read-only here: staging's own stream and subjects
        staged.prefix = staging_subject_prefix(self._names.name)

        def keep(seq: int, effects: list[Effect]) -> None:
            if seq > self._after:
                self.tail.append((seq, effects))

        fold = LiveView(staged, on_effects=keep)
        try:
            await fold.catch_up()
            if fold.broken is None:
                self.view = fold
        except (ChainBroken, WrongKey, StorageError, NatsUnavailable) as exc:
            log.warning(
                "could not fold the staged log ahead of the swap; folding the live log then",
                extra={"error": str(exc)},
            )
        finally:
            self.done.set()

    def matches(self, anchored: Anchored | None, marker_seq: int, marker_link: str) -> bool:
        """Whether the fold is the rewritten log the rotation anchored at its marker.

        The anchor may be past the marker already (a backend that switched first wrote):
        the served view then holds the fold to it when it folds that entry (`LiveView`)."""
        view = self.view
        if view is None or anchored is None:
            return False
        return (
            view.state.encryption_key == self._new.public_key
            and view.state.last_seq == marker_seq
            and view.link == marker_link
            and (
                anchored.seq > marker_seq
                or (anchored.seq == marker_seq and anchored.link == view.link)
            )
        )
