"""The entry point: inspect the live and staging streams, then resume, reuse, redo or start.

A complete but uncommitted staging stream is reused if the live log has not moved since
(its head is just before the staged `KeyRotated`); otherwise it is stale and redone. A
committed one is resumed with the new key alone; one for another new key is refused,
not deleted; one whose live log has grown past it (a backend wrote after the commit) is
refused with a message, never overwritten. One run at a time: a run takes `RotationLock`
before touching any stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from nats.aio.client import Client as NATS

from actors.crashpoints import NO_CRASHES, CrashPoints
from actors.rotation.context import API_TIMEOUT, COMMITTED, RotationRun, Staging
from actors.rotation.copy import stage
from actors.rotation.lock import RotationLock, RotationLockHeld
from actors.rotation.online import abort_staged, rotate_online
from actors.rotation.precheck import BackendKeys, check_backends
from actors.rotation.report import Counts, Outcome, RotationRefused, RotationReport
from actors.rotation.swap import commit, read_staging, swap
from projections.kv import KvLayout
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import stream_info
from secrets_nats_kv.nkeys import SigningKey
from secrets_nats_kv.xkeys import XKey


async def rotate_key(
    nc: NATS,
    *,
    names: BackendNames,
    layout: KvLayout,
    old: XKey,
    new: XKey,
    force: bool,
    dry_run: bool,
    progress: Callable[[int, int], None] | None,
    crash: CrashPoints = NO_CRASHES,
    online: bool = False,
    backends: Sequence[BackendKeys] = (),
    signer: SigningKey | None = None,
) -> RotationReport:
    """Re-seal every value and re-tag every event for `new`; see `actors.rotation` for safety.

    `online`: with backends running (`actors.rotation.online`); `backends` are those that
    answered the stats request, each of which must hold `new`. `crash` names the points
    where a test may stop the run (the product never stops). `signer`
    (AUDIT_SIGNING_SEED) signs the anchor the run writes at the rewritten log's marker.
    """
    run = RotationRun(nc, names, layout, old, new, progress, crash)
    run.backends = backends
    run.signer = signer
    note = ""
    # Online, the backends are checked once the run knows it is not finishing a swap.
    if not online and await run.backend_answers():
        # Even with --force: a backend writing during the swap would have its acknowledged
        # writes dropped with the old log and their versions handed out again.
        if dry_run:
            note = "a backend answers: stop it before the real run"
        else:
            raise RotationRefused(
                f"a backend answers on {names.subject('server_xkey')}: stop every "
                "backend first (rotate-key is offline; --force does not override this, "
                "acknowledged writes would be lost)"
            )
    del force  # kept for the CLI's compatibility; it no longer overrides the check
    if dry_run:
        return await _decide(run, dry_run=True, note=note, online=online)
    try:
        async with RotationLock(nc, names.name):
            return await _decide(run, dry_run=False, note=note, online=online)
    except RotationLockHeld as exc:  # raised on entry only: the body never ran
        raise RotationRefused(str(exc)) from None


async def abort_rotation(nc: NATS, *, names: BackendNames, layout: KvLayout, old: XKey) -> str:
    """`rotate-key --abort`: lift a standing write fence, drop uncommitted staging."""
    run = RotationRun(nc, names, layout, old, old, None, NO_CRASHES)
    try:
        async with RotationLock(nc, names.name):
            return await abort_staged(run, await run.inspect_staging())
    except RotationLockHeld as exc:
        raise RotationRefused(str(exc)) from None


async def _decide(
    run: RotationRun, *, dry_run: bool, note: str, online: bool = False
) -> RotationReport:
    """Resume, reuse, redo or start, from what the staging and live streams hold."""
    staging = await run.inspect_staging()
    if staging is not None and staging.state == COMMITTED:
        if staging.marker is None or staging.new_key != run.new.public_key:
            raise RotationRefused(
                f"a committed rotation to {staging.new_key} is half done in stream "
                f"{run.staging}: re-run with NEW_ENCRYPTION_XKEY_SEED set to that key"
            )
        await _refuse_if_live_moved_on(run, staging)
        if dry_run:
            counts, _ = await read_staging(run, staging, None, "scan")
            return _report(run, "dry run", counts, note or "would resume a committed rotation")
        return _report(run, "resumed", await swap(run, staging), note)
    if run.old.public_key == run.new.public_key:
        raise RotationRefused("the old and the new encryption keys are the same key")
    if online:
        await _check_backends(run)
    if online and not dry_run:
        if await _already_rotated(run, staging):
            return _report(run, "already rotated", Counts(), note)
        return _report(run, "rotated", await rotate_online(run, staging), note)
    live = await stream_info(run.nc, run.live, API_TIMEOUT)
    if live is None:
        raise RotationRefused(f"no event log {run.live}: nothing to rotate")
    last_seq = live.state.last_seq
    if staging is None and last_seq > 0 and run.is_marker(await run.get(run.live, last_seq)):
        return _report(run, "already rotated", Counts(), note)
    reusable = (
        staging is not None
        and staging.marker is not None
        and staging.new_key == run.new.public_key
        and staging.old_key == run.old.public_key
        and staging.last_seq == last_seq + 1
    )
    if dry_run:
        return _report(run, "dry run", await stage(run, last_seq, 0, publish=False), note)
    if staging is None or not reusable:
        if staging is not None:
            await run.delete(run.staging)  # uncommitted, so the live log is intact
        await stage(run, last_seq, live.config.num_replicas, publish=True)
        staging = await run.inspect_staging()
        if staging is None or staging.marker is None:
            raise StorageError(run.staging, "the staged log did not end with its marker")
    await run.checkpoint("staged")
    await commit(run)
    await run.checkpoint("commit")
    return _report(run, "rotated", await swap(run, staging), note)


def _report(run: RotationRun, outcome: Outcome, counts: Counts, note: str) -> RotationReport:
    if run.unswitched:
        late = f"not yet serving under the new key: {', '.join(run.unswitched)}"
        note = f"{note}; {late}" if note else late
    return RotationReport.of(
        outcome,
        run.new.public_key,
        counts,
        time.monotonic() - run.started,
        note,
        fenced_seconds=run.fenced_seconds,
        anchor_signer=run.anchor_signer,
    )


async def _check_backends(run: RotationRun) -> None:
    """Online: every answering backend holds the new key (`precheck`); one that answers
    without reporting its keys is refused too."""
    check_backends(run.backends, run.new.public_key)
    if not run.backends and await run.backend_answers():
        raise RotationRefused(
            f"a backend answers on {run.names.subject('server_xkey')} but reported no keys "
            "(not ready yet, or an older version): run again once `status` lists it"
        )


async def _already_rotated(run: RotationRun, staging: Staging | None) -> bool:
    if staging is not None:
        return False
    last_seq = await run.live_head()
    return last_seq > 0 and run.is_marker(await run.get(run.live, last_seq))


async def _refuse_if_live_moved_on(run: RotationRun, staging: Staging) -> None:
    """A committed rotation never discards staging; but it must not bury newer writes.

    If the live log is still the old one (tagged for the old key at both ends) and has
    grown past what was staged, a backend wrote to it after the commit: stop and say so
    rather than overwrite those events.
    """
    if run.old.public_key == run.new.public_key:
        return
    info = await stream_info(run.nc, run.live, API_TIMEOUT)
    if info is None:
        return
    state = info.state
    if state.messages == 0 or state.last_seq < staging.last_seq:
        return
    ends = [await run.get(run.live, state.first_seq), await run.get(run.live, state.last_seq)]
    if all(
        raw is not None and run.old_auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER))
        for raw in ends
    ):
        raise RotationRefused(
            f"the event log grew after the rotation to {staging.new_key} was committed "
            f"(did a backend run?): delete stream {run.staging} to abandon it, then re-run"
        )
