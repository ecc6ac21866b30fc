"""Phase 2: commit, then swap the live log for the committed staging stream.

The staging stream's metadata is switched to `committed` (one atomic stream update)
*before* the live log is touched. From then on the staging stream is the only source of
truth and is never discarded: the live log is deleted, recreated (`EventLog.ensure`),
filled from staging (gaps again as erased fillers, the `KeyRotated` last, so its presence
at its position proves the copy complete), the KV views are rebuilt with `rebuild_views`
and checked against `ExpectedBuckets`, and only then is the staging stream deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from actors.rotation.context import API_TIMEOUT, COMMITTED, STATE_KEY, RotationRun, Staging
from actors.rotation.copy import Converted, replay
from actors.rotation.report import Counts
from actors.rotation.verify import ExpectedBuckets
from events.anchor import Anchor
from events.log import EventLog
from events.types import Rejected, SecretPut, UndecodableEvent, decode_event
from projections.rebuild import rebuild_views
from secrets_nats_kv.barrier import CHAIN_HEADER, PREV_HEADER
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import stream_config, stream_info, update_stream
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import RawMessage, read_stream
from secrets_nats_kv.streams import kv_stream


async def commit(run: RotationRun) -> None:
    """The point of no return: from here on staging is the truth and is never dropped."""
    config = await stream_config(run.nc, run.staging, API_TIMEOUT)
    config.metadata = {**(config.metadata or {}), STATE_KEY: COMMITTED}
    await update_stream(run.nc, config, API_TIMEOUT)


async def swap(run: RotationRun, staging: Staging) -> Counts:
    """Make the live log a copy of the committed staging stream, rebuild views, clean up."""
    assert staging.marker is not None
    marker = staging.marker
    copied = await run.get(run.live, marker.seq)
    if (
        copied is None
        or copied.data != marker.data
        or copied.headers.get(TAG_HEADER) != marker.headers.get(TAG_HEADER)
    ):
        await run.delete(run.live)
        event_log = EventLog(
            run.nc,
            backend_name=run.names.name,
            barrier=run.new_auth,
            replicas=staging.replicas,
        )
        await event_log.ensure()
        async with PositionedPublisher(run.nc, run.live, run.live_prefix) as publisher:
            counts, expected = await read_staging(run, staging, publisher, "live")
        run.tick(counts.entries, counts.entries)
    else:
        counts, expected = await read_staging(run, staging, None, "scan")
    layout = dataclasses.replace(run.layout, replicas=max(run.layout.replicas, staging.replicas))

    def rebuild_progress(done: int, total: int) -> None:
        if run.crash.reached("rebuild"):
            run.crash.stop()
        run.tick(done, total)

    rebuilt = await rebuild_views(
        run.nc,
        backend_name=run.names.name,
        layout=layout,
        barrier=run.new_auth,
        progress=rebuild_progress,
    )
    secrets = await stream_info(run.nc, kv_stream(layout.secrets_bucket), API_TIMEOUT)
    mappings = await stream_info(run.nc, kv_stream(run.names.state_bucket), API_TIMEOUT)
    problem = expected.mismatch(
        rebuilt,
        None if secrets is None else secrets.state,
        None if mappings is None else mappings.state,
    )
    if problem is not None:
        raise StorageError(
            "rebuilt KV views", f"{problem}; {run.staging} is kept: re-run rotate-key"
        )
    # The anchor under the new key, at the marker: the old one no longer verifies.
    anchor = Anchor(run.nc, backend_name=run.names.name, barrier=run.new_auth)
    await anchor.ensure()
    await anchor.reset(marker.seq, marker.headers.get(CHAIN_HEADER, ""))
    await run.checkpoint("cleanup")
    await run.delete(run.staging)
    return counts


def _check_staged(
    run: RotationRun, counts: Counts, expected: ExpectedBuckets
) -> Callable[[RawMessage], Converted]:
    """Staged entries must be tagged for the new key, or be rejected placeholders."""

    def check(raw: RawMessage) -> Converted:
        tag = raw.headers.get(TAG_HEADER)
        if tag is None and not raw.data:
            counts.rejected += 1
            expected.add(raw.seq, Rejected(reason="rejected before the rotation"))
            return f"{run.live_prefix}.rejected", b"", None
        if not run.new_auth.verify(raw.seq, raw.data, tag):
            raise StorageError(run.staging, f"entry #{raw.seq} is not tagged for the new key")
        try:
            event = decode_event(raw.data)
        except UndecodableEvent:
            raise StorageError(run.staging, f"entry #{raw.seq} is not an event") from None
        counts.events += 1
        if isinstance(event, SecretPut):
            counts.resealed += 1
        expected.add(raw.seq, event)
        return run.subjects.subject_for(event), raw.data, _stored(raw.headers)

    return check


def _stored(headers: dict[str, str]) -> dict[str, str]:
    """The tag and chain headers of a staged entry, copied as they are."""
    return {
        name: headers[name] for name in (TAG_HEADER, PREV_HEADER, CHAIN_HEADER) if name in headers
    }


async def read_staging(
    run: RotationRun, staging: Staging, publisher: PositionedPublisher | None, phase: str
) -> tuple[Counts, ExpectedBuckets]:
    """Read the staged log, checking it, and copy it through `publisher` if one is given:
    every entry but the marker at its position, then the marker last. Without a publisher
    it only counts and folds (resumed runs, dry runs)."""
    marker = staging.marker
    assert marker is not None
    counts, expected = Counts(), ExpectedBuckets(run.layout.max_history)
    source = read_stream(run.nc, run.staging, f"{run.staging_prefix}.>")
    await replay(
        run,
        source,
        staging.last_seq - 1,
        _check_staged(run, counts, expected),
        publisher,
        counts,
        phase,
        on_gap=lambda seq: expected.add(seq, None),
    )
    if publisher is not None:
        subject = f"{run.live_prefix}.key"
        await publisher.publish(marker.seq, subject, marker.data, _stored(marker.headers))
        await publisher.drain()
    expected.add(marker.seq, decode_event(marker.data))
    counts.entries = staging.last_seq
    return counts, expected
