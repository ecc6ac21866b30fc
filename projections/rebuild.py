"""`rebuild`: drop the KV views and fold them again from the event log.

The log is verified first (the whole chain, with the key given): a wrong key or a
broken chain refuses before anything is dropped. The buckets come back with at least
the replica count they had.

The same fold the live view uses, from sequence 0, so the buckets come back with the
same keys, values and revisions. The writes are pipelined (a window in flight per
bucket, each pinned to its revision); erasures (of destroyed versions and their
placeholders) follow once every write is stored. A rebuild cut short is run again.

Safe while backends run: their writers write each revision at most once, whoever gets
there first. If one of them takes a revision while the pipeline is writing, the
pipeline stops at that revision (pinned writes can only leave a prefix) and the fold
is done again one write at a time, skipping every revision already stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from events.log import EventLog
from projections.foreign import check_explained, check_layout, inspect_views
from projections.kv import KvBuckets, KvLayout, KvWriter, erases, positioned_write
from projections.state import Effect, ViewState, fold
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.positioned import PositionConflict, PositionedPublisher
from secrets_nats_kv.streams import kv_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    events: int
    secrets: int
    mappings: int
    secrets_revision: int


async def rebuild_views(
    nc: NATS,
    *,
    backend_name: str,
    layout: KvLayout,
    barrier: Barrier,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Verify the log, drop both KV buckets, recreate them and write every revision the
    log implies."""
    event_log = EventLog(nc, backend_name=backend_name, barrier=barrier, replicas=layout.replicas)
    # Never drop what the log cannot write back: the original's buckets, or an import's.
    empty_log = not await event_log.exists() or await event_log.head() == 0
    for found in await inspect_views(nc, layout.secrets_bucket, layout.state_bucket):
        check_layout(found)
        if empty_log:
            check_explained(found, 0)
    if not empty_log:
        async for _ in event_log.entries():  # raises on a wrong key or a broken chain
            pass
    kept = await KvBuckets(nc, layout).replicas()
    views = KvBuckets(nc, dataclasses.replace(layout, replicas=max(layout.replicas, kept)))
    await views.drop()
    await views.ensure()
    state = await refold_views(nc, event_log, views, progress)
    return RebuildReport(
        events=state.last_seq,
        secrets=len(state.secrets),
        mappings=len(state.mappings),
        secrets_revision=state.secrets_revision,
    )


async def refold_views(
    nc: NATS,
    event_log: EventLog,
    views: KvBuckets,
    progress: Callable[[int, int], None] | None = None,
) -> ViewState:
    """Write every revision the log implies into `views`, which should start empty.

    Pipelined; if some revision is found taken (a backend's writer got there first), the
    fold is done again one write at a time, keeping what is stored and adding the rest.
    """
    if event_log.barrier is None:
        raise StorageError("rebuild", "the event log was opened without the encryption key")
    total = await event_log.head()
    writer = KvWriter(views, barrier=event_log.barrier)
    try:
        try:
            return await _refold_pipelined(nc, event_log, writer, total, progress)
        except PositionConflict:
            log.warning("a backend wrote the KV views during the rebuild; going on one by one")
            return await _refold_one_by_one(event_log, writer, total, progress)
    finally:
        writer.close()  # used offline: its queue was never run, close it


async def _refold_pipelined(
    nc: NATS,
    event_log: EventLog,
    writer: KvWriter,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> ViewState:
    """Fold the log into empty buckets with a window of pinned writes per bucket."""
    layout = writer.buckets.layout
    state = ViewState()
    erasures: list[Effect] = []  # done after the last write: no stall of the pipeline
    async with contextlib.AsyncExitStack() as stack:
        publishers: dict[str, PositionedPublisher] = {}
        for bucket in (layout.secrets_bucket, layout.state_bucket):
            # No stream pin: a header stored with each entry, which the live writer omits.
            publisher = PositionedPublisher(nc, kv_stream(bucket), expect_stream=False)
            publishers[bucket] = await stack.enter_async_context(publisher)
        # The whole log first, then the writes: reading the ordered consumer while the
        # same connection pipelines writes runs about three times slower (bench_import).
        for entry in await event_log.read_all():
            for effect in fold(state, entry.seq, entry.event):
                write = positioned_write(layout, effect, event_log.barrier)
                if write is not None:
                    await publishers[write.bucket].publish(
                        write.revision, write.subject, write.value, write.headers
                    )
                if erases(effect):
                    erasures.append(effect)
            if progress is not None:
                progress(entry.seq, total)
        for publisher in publishers.values():
            await publisher.drain()
    for effect in erasures:  # only now is everything they erase stored
        await writer.erase(effect)
    return state


async def _refold_one_by_one(
    event_log: EventLog,
    writer: KvWriter,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> ViewState:
    """Fold the log again, writing what the buckets lack one request at a time."""
    await writer.prepare()
    state = ViewState()
    async for entry in event_log.entries():
        for effect in fold(state, entry.seq, entry.event):
            if writer.already_written(effect):
                await writer.erase(effect)  # erasures are idempotent; the write is there
            else:
                await writer.apply(effect)
        if progress is not None:
            progress(entry.seq, total)
    return state
