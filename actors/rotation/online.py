"""`rotate-key --online`: stage while backends serve, fence writes briefly, swap.

The same staging stream and swap as the offline rotation, made safe with running
backends (which hold the new key as their next one, `precheck`):

1. Copy the live log into staging while backends keep writing (`catchup.LiveCopy`),
   pass after pass until the copy is at the live head.
2. Fence: append `WritesFenced(new_key, rotation)` to the live log, pinned right after
   the copied head (`fence`); if a backend wrote meanwhile the append fails, the copy
   catches up and the fence is tried again (a bounded number of times). From the fence
   on, backends refuse writes (`RotationInProgress`) and keep serving gets.
3. Copy the fence, stage the `KeyRotated` marker right after it, commit, swap (`swap`
   with the online order: the refill, the anchor under the new key, then the marker,
   which ends the fence: a backend that sees it switches; the KV views are rebuilt
   after it, with writes going on).

A re-run finishes from any point. Before the commit an incomplete staging stream is
dropped and the copy redone (a fence this rotation already set stays standing and is
simply copied, so it is not set twice); a complete one is reused if the live log still
ends with its fence. A run that refuses after fencing lifts its fence (it gives up).
After the commit the swap is finished (`plan`). `--abort`
(`abort_staged`) lifts a standing fence with `FenceLifted` and drops staging, and is
refused once committed: from there only finishing is safe.
"""

from __future__ import annotations

import contextlib

from actors.rotation.catchup import LiveCopy
from actors.rotation.context import API_TIMEOUT, COMMITTED, RotationRun, Staging
from actors.rotation.copy import create_staging
from actors.rotation.fence import (
    append_fence,
    fence_at,
    fence_event,
    lift_fence,
    new_rotation_id,
)
from actors.rotation.report import Counts, RotationRefused
from actors.rotation.swap import commit, swap
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import stream_info
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import RawMessage

MAX_PASSES = 100  # copy passes before giving up on a log that never stands still


async def rotate_online(run: RotationRun, staging: Staging | None) -> Counts:
    """Stage (or reuse staging), commit, swap; the staged log's counts.

    A run that refuses after writes were fenced for its key (the log grew after the
    fence, a chain that breaks at the head) lifts that fence and drops its staging
    before it says why: it gives up, so writes must not stay stopped.
    """
    try:
        kept = await stage_online(run, staging)
        staging = complete(await run.inspect_staging())
        await run.checkpoint("staged")
        await refuse_if_grown(run, staging.last_seq - 1)
    except RotationRefused as exc:
        await _give_up(run, str(exc))
        raise
    await commit(run)
    await run.checkpoint("commit")
    return await swap(run, staging, kept)


async def _give_up(run: RotationRun, why: str) -> None:
    """Lift a fence to this run's new key, drop uncommitted staging (best effort: the
    refusal is what the operator must see; `--abort` does the same later)."""
    with contextlib.suppress(RotationRefused, StorageError):
        await lift_fence(run, f"the rotation gave up: {why}", only_for=run.new.public_key)
    with contextlib.suppress(StorageError):
        await run.delete(run.staging)


async def stage_online(run: RotationRun, staging: Staging | None) -> dict[int, RawMessage] | None:
    """Make staging complete (the fence, then the marker, at the live head), or reuse it;
    what it staged, by position, when it fits in memory (`LiveCopy.kept`)."""
    info = await stream_info(run.nc, run.live, API_TIMEOUT)
    if info is None:
        raise RotationRefused(f"no event log {run.live}: nothing to rotate")
    last_seq = info.state.last_seq
    if staging is not None and await _reusable(run, staging, last_seq):
        return None
    if staging is not None:
        await run.delete(run.staging)  # uncommitted, so the live log is intact
    counts = Counts()
    await create_staging(run, info.config.num_replicas)
    try:
        async with PositionedPublisher(run.nc, run.staging, run.staging_prefix) as publisher:
            copy = LiveCopy(run, publisher, counts)
            await _copy_and_fence(run, copy)
            copy.resealer.check_chain()
            encoded = copy.resealer.marker(copy.head + 1)
            subject = f"{run.staging_prefix}.key"
            await publisher.publish(encoded.seq, subject, encoded.body, encoded.headers)
            await publisher.drain()
    except RotationRefused:
        await run.delete(run.staging)  # uncommitted: nothing to keep
        raise
    run.tick(copy.head + 1, copy.head + 1)
    return copy.kept


async def _copy_and_fence(run: RotationRun, copy: LiveCopy) -> None:
    """Copy until at the head, set the fence there, copy it: staging ends with the fence."""
    rotation = new_rotation_id()
    previous_head = -1
    for attempt in range(MAX_PASSES):
        head = await run.live_head()
        await copy.copy_to(head, "stage" if attempt == 0 else "catchup")
        if not copy.caught_up:
            if head == previous_head:
                copy.resealer.check_chain()  # the log stood still: an unnamed gap, refused
            previous_head = head
            continue
        fence = copy.fence
        if fence is not None:  # standing in what is copied: this run's, or an earlier one's
            if fence.new_key != run.new.public_key:
                raise RotationRefused(
                    f"writes are fenced by an unfinished rotation to {fence.new_key} "
                    f"(entry #{fence.seq}): finish it (NEW_ENCRYPTION_XKEY_SEED set to that "
                    "key) or lift the fence with rotate-key --online --abort"
                )
            break
        if await append_fence(run, fence_event(run, rotation), copy.head, copy.resealer.old_link):
            await run.checkpoint("fenced")
        # The next pass copies the fence, or first what a backend wrote before it.
    else:
        raise RotationRefused(
            f"the event log kept growing through {MAX_PASSES} copy passes: "
            "no moment to fence writes; run again when the load is lower"
        )
    await refuse_if_grown(run, copy.head)


async def refuse_if_grown(run: RotationRun, fenced_head: int) -> None:
    """Nothing may follow the fence: a writer that ignores it would lose its entries."""
    if await run.live_head() != fenced_head:
        raise RotationRefused(
            f"the event log grew after the write fence at #{fenced_head} (a writer that "
            "does not honour it?): stop it and run again"
        )


async def _reusable(run: RotationRun, staging: Staging, last_seq: int) -> bool:
    """Complete staging for these keys whose fence still ends the live log."""
    if (
        staging.marker is None
        or staging.new_key != run.new.public_key
        or staging.old_key != run.old.public_key
        or staging.last_seq != last_seq + 1
    ):
        return False
    return await fence_at(run, run.live, last_seq, run.old_auth) is not None


async def abort_staged(run: RotationRun, staging: Staging | None) -> str:
    """Lift a standing fence and drop uncommitted staging; what was done, in words."""
    if staging is not None and staging.state == COMMITTED:
        raise RotationRefused(
            f"the rotation to {staging.new_key} is committed and cannot be aborted: "
            "run rotate-key --online again to finish the swap"
        )
    done = []
    lifted = await lift_fence(run, "aborted by rotate-key --abort")
    if lifted is not None:
        done.append(f"lifted the write fence at entry #{lifted.seq} (rotation to {lifted.new_key})")
    if staging is not None:
        await run.delete(run.staging)
        done.append(f"dropped the uncommitted staging stream {run.staging}")
    if not done:
        return "nothing to abort: no write fence stands and no rotation is staged"
    return "aborted the rotation: " + ", ".join(done)


def complete(staging: Staging | None) -> Staging:
    if staging is None or staging.marker is None:
        raise StorageError("rotate-key staging", "the staged log did not end with its marker")
    return staging
