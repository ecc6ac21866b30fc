"""Phase 1 (stage) and the copy loop both phases share.

Staging copies the live log into a fresh staging stream, each `SecretPut` re-sealed and
every event re-tagged for the new key at the same position, gaps reproduced (a filler
published at the position, then erased), ending with the `KeyRotated` marker. Entries
the old key does not authenticate (forgeries) stay rejected: an empty, untagged
placeholder keeps their position. Copies carry no `Nats-Msg-Id`, so the duplicate
window starts empty after a rotation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable

import msgspec
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
from events.chain import ChainBroken, ChainReader, Raw, WrongKey
from events.codec import EventCodec
from events.types import Event, KeyRotated, SecretPut, UndecodableEvent, decode_event
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import GENESIS
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.nats.jetstream import create_stream, erase_message
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import RawMessage, read_stream
from secrets_nats_kv.xkeys import SealBox

EARLY_REJECTS = 8  # this many rejected entries before any valid one: the old key is wrong
WRONG_OLD_KEY = (
    "ENCRYPTION_XKEY_SEED does not authenticate the event log: "
    "it must be the key the backend runs with now"
)

# An entry as it is to be written: subject, body, headers (None: an untagged placeholder).
Converted = tuple[str, bytes, dict[str, str] | None]


def patched_put(body: bytes, sealed: bytes) -> bytes:
    """The put's JSON with only `sealed` replaced: fields this version does not know survive."""
    document = msgspec.json.decode(body)
    document["sealed"] = sealed
    return msgspec.json.encode(document)


async def stage(run: RotationRun, last_seq: int, replicas: int, *, publish: bool) -> Counts:
    """Copy the live log into a fresh staging stream, re-sealed, re-tagged and re-chained.

    The old log's chain is checked as it is read (`ChainReader`, old key): a broken chain
    refuses the rotation before the commit, so a tampered log is never laundered into a
    fresh valid chain. With `publish=False` (dry run) it only reads, opens and counts.
    """
    old_box, new_box = SealBox(run.old, run.old), SealBox(run.new, run.new)
    counts = Counts()
    checker = ChainReader(EventCodec(run.old_auth))
    codec = EventCodec(run.new_auth)
    link = GENESIS  # the new chain, as far as it is written

    def on_gap(seq: int) -> None:
        nonlocal link
        checker.push(Raw(seq, 0.0, None))
        link = codec.erased_link(seq, link)

    def convert_entry(raw: RawMessage) -> Converted:
        nonlocal link
        checker.push(Raw(raw.seq, 0.0, raw.data, raw.headers))
        tag = raw.headers.get(TAG_HEADER)
        event: Event | None = None
        if run.old_auth.verify(raw.seq, raw.data, tag):
            try:
                event = decode_event(raw.data)
            except UndecodableEvent:
                event = None
        elif run.new_auth.verify(raw.seq, raw.data, tag):
            raise RotationRefused(
                f"event #{raw.seq} of {run.live} is already tagged for the new key: "
                "the log is half rotated by other means; restore it before rotating"
            )
        if event is None:
            counts.rejected += 1
            if counts.events == 0 and counts.rejected >= EARLY_REJECTS:
                raise RotationRefused(WRONG_OLD_KEY)
            return f"{run.staging_prefix}.rejected", b"", None
        counts.events += 1
        body = raw.data
        if isinstance(event, SecretPut):
            try:
                plaintext = old_box.open(event.sealed)
            except DecryptionError:
                raise RotationRefused(
                    f"the value of {event.name!r} at event #{raw.seq} does not open with "
                    "ENCRYPTION_XKEY_SEED"
                ) from None
            counts.resealed += 1
            if not publish:
                return "", body, None
            body = patched_put(body, new_box.seal(plaintext))
        encoded = codec.encode_body(body, raw.seq, link)
        link = encoded.link
        suffix = run.subjects.subject_for(event)[len(run.live_prefix) :]
        return run.staging_prefix + suffix, body, encoded.headers

    def check_chain() -> None:
        try:
            checker.at_head()
        except WrongKey:
            raise RotationRefused(WRONG_OLD_KEY) from None
        except ChainBroken as exc:
            raise RotationRefused(
                f"{exc}: run `secrets-nats-kv verify` and `repair` before rotating"
            ) from None

    source = read_stream(run.nc, run.live, f"{run.live_prefix}.>")
    if not publish:
        await replay(run, source, last_seq, convert_entry, None, counts, "stage", on_gap=on_gap)
        if counts.events == 0 and counts.rejected:
            raise RotationRefused(WRONG_OLD_KEY)
        check_chain()
        counts.entries = last_seq + 1
        return counts
    await _create_staging(run, replicas)
    try:
        async with PositionedPublisher(run.nc, run.staging, run.staging_prefix) as publisher:
            await replay(
                run, source, last_seq, convert_entry, publisher, counts, "stage", on_gap=on_gap
            )
            if counts.events == 0 and counts.rejected:
                raise RotationRefused(WRONG_OLD_KEY)
            check_chain()
            marker = KeyRotated(
                at=time.time(), old_key=run.old.public_key, new_key=run.new.public_key
            )
            encoded = codec.encode(marker, last_seq + 1, link)
            subject = f"{run.staging_prefix}.key"
            await publisher.publish(encoded.seq, subject, encoded.body, encoded.headers)
            await publisher.drain()
    except RotationRefused:
        await run.delete(run.staging)  # nothing to keep: the live log is untouched
        raise
    counts.entries = last_seq + 1
    run.tick(counts.entries, counts.entries)
    return counts


async def _create_staging(run: RotationRun, replicas: int) -> None:
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
) -> None:
    """Positions 1..last_seq: entries converted, gaps as fillers erased at the end."""
    total = last_seq + 1
    fillers: list[int] = []
    expected = 1

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
