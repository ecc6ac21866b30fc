"""`rebuild`: drop the KV views and fold them again from the event log.

The same fold the live view uses, from sequence 0, so the buckets come back with the
same keys, values and revisions. Safe while backends run: their writers write each
revision at most once, whoever gets there first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from events.integrity import EventAuthenticator
from events.log import EventLog
from projections.kv import KvLayout, KvViews, KvWriter
from projections.state import ViewState, fold


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
    authenticator: EventAuthenticator,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Drop both KV buckets, recreate them and write every revision the log implies."""
    event_log = EventLog(
        nc, backend_name=backend_name, authenticator=authenticator, replicas=layout.replicas
    )
    views = KvViews(nc, layout)
    total = await event_log.head()
    await views.drop()
    await views.ensure()
    writer = KvWriter(views, event_log)
    state = ViewState()
    try:
        async for entry in event_log.entries():
            for effect in fold(state, entry.seq, entry.event):
                await writer.apply(effect)
            if progress is not None:
                progress(entry.seq, total)
    finally:
        writer.close()  # used offline: its queue was never run, close it
    return RebuildReport(
        events=state.last_seq,
        secrets=len(state.secrets),
        mappings=len(state.mappings),
        secrets_revision=state.secrets_revision,
    )
