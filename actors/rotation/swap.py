"""Phase 2: commit, then swap the live log for the committed staging stream.

The staging stream's metadata is switched to `committed` (one atomic stream update)
*before* the live log is touched. From then on the staging stream is the only source of
truth and is never discarded: the live log is deleted, recreated (`EventLog.ensure`),
filled from staging (gaps again as erased fillers, the `KeyRotated` last, so its presence
at its position proves the copy complete), the KV views are rebuilt with `rebuild_views`
and checked against `ExpectedBuckets`, and only then is the staging stream deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable

from actors.rotation.access import retag_access_log
from actors.rotation.context import API_TIMEOUT, COMMITTED, STATE_KEY, RotationRun, Staging
from actors.rotation.copy import Converted, replay
from actors.rotation.fence import fence_at
from actors.rotation.report import Counts
from actors.rotation.switch import wait_for_switch
from actors.rotation.verify import ExpectedBuckets
from events.anchor import Anchor
from events.log import EventLog
from events.types import (
    ForeignDropped,
    Rejected,
    SecretPut,
    UndecodableEvent,
    WritesFenced,
    decode_event,
)
from projections.rebuild import rebuild_views
from secrets_nats_kv.barrier import CHAIN_HEADER, PREV_HEADER
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import (
    stream_info,
)
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.provisioning import (
    stream_config,
    update_stream,
)
from secrets_nats_kv.nats.reader import RawMessage, read_stream
from secrets_nats_kv.streams import kv_stream


async def commit(run: RotationRun) -> None:
    """The point of no return: from here on staging is the truth and is never dropped."""
    config = await stream_config(run.nc, run.staging, API_TIMEOUT)
    config.metadata = {**(config.metadata or {}), STATE_KEY: COMMITTED}
    await update_stream(run.nc, config, API_TIMEOUT)


async def swap(
    run: RotationRun, staging: Staging, kept: dict[int, RawMessage] | None = None
) -> Counts:
    """Make the live log a copy of the committed staging stream, rebuild views, clean up.

    A staged log whose marker follows a write fence (an online rotation, backends
    running) is swapped in the online order: the refill, the anchor under the new key,
    then the marker, which ends the fence (backends switch once they see it with the
    anchor); the KV views are rebuilt after it, while backends may write again
    (`rebuild_views` is safe with running writers), so the fence lasts the refill only.
    `kept`: the staged entries as this run wrote them (the refill reads them from memory
    instead of the staging stream; they are checked the same way).
    """
    assert staging.marker is not None
    marker = staging.marker
    fence = await staged_fence(run, staging)
    copied = await run.get(run.live, marker.seq)
    if (
        copied is not None
        and copied.data == marker.data
        and copied.headers.get(TAG_HEADER) == marker.headers.get(TAG_HEADER)
    ):
        counts, expected = await read_staging(run, staging, None, "scan")
        await _rebuild_checked(run, staging, expected, online=fence is not None)
        if fence is None:  # online, the anchor moved before the marker (writers follow it)
            await _reset_anchor(run, marker)
        await _drop_staging(run)
        return counts
    await run.delete(run.live)
    event_log = EventLog(
        run.nc, backend_name=run.names.name, barrier=run.new_auth, replicas=staging.replicas
    )
    await event_log.ensure()
    async with PositionedPublisher(run.nc, run.live, run.live_prefix) as publisher:
        counts, expected = await read_staging(
            run, staging, publisher, "live", with_marker=fence is None, kept=kept
        )
        run.tick(counts.entries, counts.entries)
        if fence is not None:
            await run.checkpoint("filled")
            await _reset_anchor(run, marker)
            await _publish_marker(run, publisher, marker)
            run.fenced_seconds = max(time.time() - fence.at, 0.0)
            expected.add(marker.seq, decode_event(marker.data))
            await _rebuild_checked(run, staging, expected, online=True)
            await _drop_staging(run)
            return counts
    await _rebuild_checked(run, staging, expected)
    await _reset_anchor(run, marker)
    await _drop_staging(run)
    return counts


async def staged_fence(run: RotationRun, staging: Staging) -> WritesFenced | None:
    """The write fence to the new key right before the staged marker, if there is one."""
    assert staging.marker is not None
    return await fence_at(run, run.staging, staging.marker.seq - 1, run.new_auth)


async def _rebuild_checked(
    run: RotationRun, staging: Staging, expected: ExpectedBuckets, *, online: bool = False
) -> None:
    """Rebuild both KV views from the live log; they must match the staged log's fold
    (online, once backends wrote after the marker, the rebuild must reach the marker)."""
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
    if online and await run.live_head() > expected.state.last_seq:
        if rebuilt.events < expected.state.last_seq:
            raise StorageError(
                "rebuilt KV views",
                f"folded {rebuilt.events} entries, the staged log has "
                f"{expected.state.last_seq}; {run.staging} is kept: re-run rotate-key",
            )
        return  # backends write again: the views follow the log they extend
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


async def _reset_anchor(run: RotationRun, marker: RawMessage) -> None:
    """The anchor under the new key, at the marker: the old one no longer verifies.

    With the operator's AUDIT_SIGNING_SEED (`run.signer`) it is a signed backend
    checkpoint like those `run` writes, so an audit export made after the rotation has
    one at the rewritten log's marker; without it the anchor is unsigned (the report says
    so) until a backend with the seed writes the next one."""
    anchor = Anchor(run.nc, backend_name=run.names.name, barrier=run.new_auth, signer=run.signer)
    await anchor.ensure()
    await anchor.reset(marker.seq, marker.headers.get(CHAIN_HEADER, ""))
    run.anchor_signer = run.signer.public_key if run.signer is not None else ""


async def _drop_staging(run: RotationRun) -> None:
    """The last steps: the backends switched (`switch`, online), the access log re-tagged
    (`access`), then staging deleted."""
    run.unswitched = await wait_for_switch(run, run.backends)
    await retag_access_log(run)
    await run.checkpoint("cleanup")
    await run.delete(run.staging)


async def _publish_marker(
    run: RotationRun, publisher: PositionedPublisher, marker: RawMessage
) -> None:
    subject = f"{run.live_prefix}.key"
    await publisher.publish(marker.seq, subject, marker.data, _stored(marker.headers))
    await publisher.drain()


async def _from_memory(kept: dict[int, RawMessage]) -> AsyncGenerator[RawMessage, None]:
    for raw in kept.values():
        yield raw


async def _dropped_positions(run: RotationRun, kept: dict[int, RawMessage] | None) -> set[int]:
    """Gaps where a `repair` removed junk (named by a tagged `ForeignDropped`, on the `key`
    subject): the rebuild counts no erased revision there (`events.chain`)."""
    # One more read of staging, by direct gets as the copy's (no consumer to grant).
    if kept is None:
        source = read_stream(run.nc, run.staging, f"{run.staging_prefix}.>")
    else:
        source = _from_memory(kept)
    dropped: set[int] = set()
    async for raw in source:
        if run.new_auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER)):
            with contextlib.suppress(UndecodableEvent):
                event = decode_event(raw.data)
                if isinstance(event, ForeignDropped):
                    dropped.update(named for named in event.positions() if named < raw.seq)
    return dropped


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
    run: RotationRun,
    staging: Staging,
    publisher: PositionedPublisher | None,
    phase: str,
    *,
    with_marker: bool = True,
    kept: dict[int, RawMessage] | None = None,
) -> tuple[Counts, ExpectedBuckets]:
    """Read the staged log, checking it, and copy it through `publisher` if one is given:
    every entry but the marker at its position, then the marker last (`with_marker`:
    else the caller writes it later, and the fold stops before it). Without a publisher
    it only counts and folds (resumed runs, dry runs)."""
    marker = staging.marker
    assert marker is not None
    counts, expected = Counts(), ExpectedBuckets(run.layout.max_history)
    dropped = await _dropped_positions(run, kept)
    if kept is None:
        source = read_stream(run.nc, run.staging, f"{run.staging_prefix}.>")
    else:
        source = _from_memory(kept)
    await replay(
        run,
        source,
        staging.last_seq - 1,
        _check_staged(run, counts, expected),
        publisher,
        counts,
        phase,
        on_gap=lambda seq: None if seq in dropped else expected.add(seq, None),
    )
    counts.entries = staging.last_seq
    if not with_marker:
        return counts, expected
    if publisher is not None:
        await _publish_marker(run, publisher, marker)
    expected.add(marker.seq, decode_event(marker.data))
    return counts, expected
