"""Phase 1 (stage) and the copy loop both phases share (`replay`).

Staging copies the live log into a fresh staging stream, each `SecretPut` re-sealed and
every event re-tagged for the new key at the same position, gaps reproduced (a filler
published at the position, then erased), ending with the `KeyRotated` marker. Entries
the old key does not authenticate (forgeries) stay rejected: an empty, untagged
placeholder keeps their position (`reseal` converts each entry). Copies carry no
`Nats-Msg-Id`, so the duplicate window starts empty after a rotation.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

from nats.js import api

from actors.rotation.context import (
    API_TIMEOUT,
    NEW_KEY_KEY,
    OLD_KEY_KEY,
    STAGING,
    STATE_KEY,
    RotationRun,
)
from actors.rotation.report import Counts, RotationRefused
from actors.rotation.reseal import Converted, Resealer
from secrets_nats_kv.nats.jetstream import (
    erase_message,
)
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.provisioning import (
    create_stream,
)
from secrets_nats_kv.nats.reader import RawMessage, read_stream

__all__ = ["Converted", "create_staging", "replay", "stage"]


async def stage(run: RotationRun, last_seq: int, replicas: int, *, publish: bool) -> Counts:
    """Copy the live log into a fresh staging stream, re-sealed, re-tagged and re-chained.

    The old log's chain is checked as it is read (`ChainReader`, old key): a broken chain
    refuses the rotation before the commit, so a tampered log is never laundered into a
    fresh valid chain. With `publish=False` (dry run) it only reads, opens and counts.
    """
    counts = Counts()
    resealer = Resealer(run, counts, publish=publish)
    source = read_stream(run.nc, run.live, f"{run.live_prefix}.>")
    if not publish:
        await replay(
            run, source, last_seq, resealer.convert, None, counts, "stage", on_gap=resealer.gap
        )
        resealer.check_chain()
        counts.entries = last_seq + 1
        return counts
    await create_staging(run, replicas)
    try:
        async with PositionedPublisher(run.nc, run.staging, run.staging_prefix) as publisher:
            await replay(
                run,
                source,
                last_seq,
                resealer.convert,
                publisher,
                counts,
                "stage",
                on_gap=resealer.gap,
            )
            resealer.check_chain()
            encoded = resealer.marker(last_seq + 1)
            subject = f"{run.staging_prefix}.key"
            await publisher.publish(encoded.seq, subject, encoded.body, encoded.headers)
            await publisher.drain()
    except RotationRefused:
        await run.delete(run.staging)  # nothing to keep: the live log is untouched
        raise
    counts.entries = last_seq + 1
    run.tick(counts.entries, counts.entries)
    return counts


async def create_staging(run: RotationRun, replicas: int) -> None:
    config = api.StreamConfig(
        name=run.staging,
        description="secrets-nats-kv rotate-key staging (do not delete while committed)",
        subjects=[f"{run.staging_prefix}.>"],
        storage=api.StorageType.FILE,
        num_replicas=max(replicas, 1),
        allow_direct=True,
        metadata={
            STATE_KEY: STAGING,
            NEW_KEY_KEY: run.new.public_key,
            OLD_KEY_KEY: run.old.public_key,
        },
    )
    await create_stream(run.nc, config, API_TIMEOUT)


async def replay(
    run: RotationRun,
    source: AsyncGenerator[RawMessage, None],
    last_seq: int,
    convert_entry: Callable[[RawMessage], Converted],
    publisher: PositionedPublisher | None,
    counts: Counts,
    phase: str,
    *,
    on_gap: Callable[[int], None] | None = None,
    first_seq: int = 1,
) -> None:
    """Positions first_seq..last_seq: entries converted, gaps as fillers erased at the end."""
    total = last_seq + 1
    fillers: list[int] = []
    expected = first_seq

    async def write(seq: int, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        if publisher is None:
            return
        await publisher.publish(seq, subject, body, headers)
        await run.checkpoint(phase, publisher)

    async def gaps_until(seq: int) -> None:
        nonlocal expected
        for gap in range(expected, seq):
            counts.erased += 1
            fillers.append(gap)
            if on_gap is not None:
                on_gap(gap)
            if publisher is not None:
                await write(gap, f"{publisher.prefix}.erased", b"", None)
            run.tick(gap, total)
        expected = seq

    async with contextlib.aclosing(source):
        async for raw in source:
            if raw.seq > last_seq:
                break
            await gaps_until(raw.seq)
            subject, body, headers = convert_entry(raw)
            await write(raw.seq, subject, body, headers)
            run.tick(raw.seq, total)
            expected = raw.seq + 1
    await gaps_until(last_seq + 1)
    if publisher is None:
        return
    await publisher.drain()
    for seq in fillers:
        await erase_message(run.nc, publisher.stream, seq, API_TIMEOUT)
