"""The write fence in the live log: set once the copy has caught up, lifted by `--abort`.

Both marks are ordinary events of the live log, tagged and chained under the current
(old) key and appended with `Nats-Expected-Last-Sequence`, so a fence lands exactly
after the last entry the copy has staged: if a backend wrote meanwhile, the append
fails and the copy catches up again. Backends fold `WritesFenced` and refuse writes
until the swapped log's `KeyRotated` (or a `FenceLifted`) ends it.
"""

from __future__ import annotations

import time
import uuid

from actors.rotation.context import RotationRun
from actors.rotation.report import RotationRefused
from events.chain import ChainBroken, WrongKey
from events.log import ConcurrentAppend, EventLog
from events.types import FenceLifted, KeyRotated, UndecodableEvent, WritesFenced, decode_event
from projections.state import Fence
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import GENESIS, Barrier

LIFT_ATTEMPTS = 5  # a fenced log does not move; a retry only covers a stray writer


def new_rotation_id() -> str:
    return uuid.uuid4().hex


def old_log(run: RotationRun) -> EventLog:
    """The live log under the old key (what the fence and its lifting are tagged with)."""
    return EventLog(run.nc, backend_name=run.names.name, barrier=run.old_auth)


async def append_fence(
    run: RotationRun, event: WritesFenced, after: int, previous: str
) -> int | None:
    """Append the fence as entry `after + 1` (following link `previous`); its position,
    or None if the log moved on since `after`."""
    try:
        appended = await old_log(run).append(event, expected_last_seq=after, previous=previous)
    except ConcurrentAppend:
        return None
    return appended.seq


def fence_event(run: RotationRun, rotation: str) -> WritesFenced:
    return WritesFenced(at=time.time(), new_key=run.new.public_key, rotation=rotation)


async def standing_fence(log: EventLog) -> tuple[Fence | None, int, str]:
    """The fence the whole live log leaves standing (None if none), its head and tail link."""
    fence: Fence | None = None
    seq, link = 0, GENESIS
    try:
        async for entry in log.entries():
            seq = entry.seq
            link = entry.link or link
            if isinstance(entry.event, WritesFenced):
                fence = Fence(entry.event.new_key, entry.event.rotation, entry.seq)
            elif isinstance(entry.event, FenceLifted | KeyRotated):
                fence = None
    except WrongKey:
        raise RotationRefused(
            "ENCRYPTION_XKEY_SEED does not authenticate the event log (was the rotation "
            "already swapped in? then there is nothing to abort)"
        ) from None
    except ChainBroken as exc:
        raise RotationRefused(f"{exc}: run `secrets-nats-kv verify`") from None
    return fence, seq, link


async def lift_fence(run: RotationRun, reason: str, only_for: str | None = None) -> Fence | None:
    """Append `FenceLifted` for the fence the live log leaves standing (only if it names
    the key `only_for`, when given); which one it lifted."""
    log = old_log(run)
    for _ in range(LIFT_ATTEMPTS):
        fence, head, link = await standing_fence(log)
        if fence is None or (only_for is not None and fence.new_key != only_for):
            return None
        lifted = FenceLifted(at=time.time(), rotation=fence.rotation, reason=reason)
        try:
            await log.append(lifted, expected_last_seq=head, previous=link)
        except ConcurrentAppend:
            continue
        return fence
    raise RotationRefused(
        f"the event log kept changing while lifting the write fence ({LIFT_ATTEMPTS} tries)"
    )


async def fence_at(run: RotationRun, stream: str, seq: int, auth: Barrier) -> WritesFenced | None:
    """The fence to the new key at `seq` of `stream` if `auth` authenticates it there."""
    raw = await run.get(stream, seq) if seq > 0 else None
    if raw is None or not auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER)):
        return None
    try:
        event = decode_event(raw.data)
    except UndecodableEvent:
        return None
    if isinstance(event, WritesFenced) and event.new_key == run.new.public_key:
        return event
    return None
