"""`repair` removes entries that are not ours, on the record, so a start stops paying for them.

Anyone who may publish on the log's subjects can fill it with junk: every entry not
tagged by our key is rejected by every read of the log, at every start, for as long as
it is stored. `drop_foreign` first appends a tagged `ForeignDropped` naming the positions
that hold such entries (pinned after the head, like every append), then erases them.
The order matters: a gap no verified event names breaks the chain, so the record must
exist before the first erase. Interrupted between the two, a rerun finds the positions
still stored, already named, and only erases them.

The claim cannot hide a real entry: the reader carries the chain's link across a named
position unchanged, so had it held an entry of ours, the next one's link no longer
matches and the chain breaks there (see `events.chain`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from events.anchor import Anchor
from events.chain import ChainReader, Raw, Verified
from events.codec import EventCodec
from events.log import EventLog
from events.repair import read_raw
from events.types import ForeignDropped, Rejected, as_ranges
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import erase_message
from secrets_nats_kv.nkeys import SigningKey

# Runs per event: an interleaved flood is one run per entry; this many keeps an event
# far below the event size limit (about 20 bytes a run).
MAX_RUNS = 8192
ERASING_AT_ONCE = 32  # removal requests in flight
API_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Dropped:
    """What `drop_foreign` did: positions erased, and the `ForeignDropped` events written."""

    erased: int
    record_seq: int  # the last ForeignDropped appended (0: a rerun that only erased)


@dataclass(frozen=True, slots=True)
class ForeignFound:
    """The log as read whole: entries not ours still stored, and which are already named."""

    stored: list[int]
    named: set[int]
    head: int
    link: str  # the link the next entry of ours follows


def find_foreign(codec: EventCodec, raws: list[Raw]) -> ForeignFound:
    """Read `raws` through the chain (raises `ChainBroken` or `WrongKey`)."""
    reader = ChainReader(codec)
    released: list[Verified] = []
    for raw in raws:
        released += reader.push(raw)
    released += reader.at_head()
    stored: list[int] = []
    named: set[int] = set()
    for entry in released:
        if isinstance(entry.event, Rejected) and not entry.link:
            stored.append(entry.seq)  # not tagged by our key (never one of ours)
        elif isinstance(entry.event, ForeignDropped):
            named.update(seq for seq in entry.event.positions() if seq < entry.seq)
    return ForeignFound(stored, named, len(raws), reader.link)


async def drop_foreign(
    event_log: EventLog, *, admin_key: str, reason: str, signer: SigningKey | None = None
) -> Dropped:
    """Record, then erase, every stored entry of the log not tagged by our key.

    The chain must read whole (run `repair_log` first). Positional like every append: if
    anything was appended meanwhile it fails (`ConcurrentAppend`) and is run again.
    """
    codec = event_log.codec
    if codec is None:
        raise StorageError("repair", "the encryption key is needed to verify the event log")
    found = find_foreign(codec, await read_raw(event_log))
    unnamed = [seq for seq in found.stored if seq not in found.named]
    runs = as_ranges(unnamed)
    last_seq, link = found.head, found.link
    recorded = False
    for start in range(0, len(runs), MAX_RUNS):
        chunk = tuple(runs[start : start + MAX_RUNS])
        event = ForeignDropped(
            at=time.time(),
            admin_key=admin_key,
            ranges=chunk,
            count=sum(last - first + 1 for first, last in chunk),
            reason=reason,
        )
        appended = await event_log.append(event, expected_last_seq=last_seq, previous=link)
        last_seq, link, recorded = appended.seq, appended.link, True
    if recorded:
        anchor = Anchor(
            event_log.nc, backend_name=event_log.backend_name, barrier=codec.barrier, signer=signer
        )
        await anchor.ensure()
        await anchor.advance(last_seq, link)
    await _erase_all(event_log, found.stored)
    return Dropped(len(found.stored), last_seq if recorded else 0)


async def _erase_all(event_log: EventLog, seqs: list[int]) -> None:
    limiter = anyio.CapacityLimiter(ERASING_AT_ONCE)

    async def erase(seq: int) -> None:
        async with limiter:
            await erase_message(event_log.nc, event_log.stream, seq, API_TIMEOUT, overwrite=False)

    async with anyio.create_task_group() as group:
        for seq in seqs:
            group.start_soon(erase, seq)
