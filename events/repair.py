"""The operator's way out of a broken chain: `verify` locates the break, `repair` accepts it.

`verify_log` reads the whole log through the `ChainReader` and says where it breaks, if
it does. `plan_repair` works out the smallest `LogRepaired` that lets the chain be read
to its head: each missing position no destroy names is *lost* (its content is unknown
and stays so; the fold counts it as an erased revision, so no version is reused), and
each entry of ours that no longer links (the one after a lost run, or one whose
predecessor was replaced) is *relinked* (its own recorded link is accepted). The repair
is an event like any other: tagged, chained, kept in the log and shown by `audit export`,
so accepting a break is on the record. Nothing here erases or rewrites an entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from events.anchor import Anchor, Anchored, AnchorForged
from events.chain import ChainBroken, ChainReader, Raw
from events.codec import EventCodec
from events.log import Appended, EventLog
from events.types import LogRepaired
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.reader import stream_messages
from secrets_nats_kv.nkeys import SigningKey


@dataclass(frozen=True, slots=True)
class Verification:
    """What `verify` found: how far the chain reads, and the break if there is one."""

    head: int  # the log's last sequence
    verified: int  # entries released up to the break (or the head)
    foreign: int  # entries not tagged by our key (skipped, as forgeries)
    broken: ChainBroken | None


async def read_raw(event_log: EventLog) -> list[Raw]:
    """Every position of the log up to its head as read now, gaps as `Raw` without a body."""
    head = (await event_log.state()).last_seq
    raws: list[Raw] = []
    async for message in stream_messages(
        event_log.nc, event_log.stream, f"{event_log.prefix}.>", until=head
    ):
        raws += [Raw(gap, message.time, None) for gap in range(len(raws) + 1, message.seq)]
        raws.append(Raw(message.seq, message.time, message.data, message.headers))
    raws += [Raw(gap, 0.0, None) for gap in range(len(raws) + 1, head + 1)]
    return raws


def verify_raw(
    codec: EventCodec, raws: list[Raw], anchored: Anchored | None = None
) -> Verification:
    """Judge a whole log held in memory against its anchor (raises `WrongKey` if none of
    it is ours)."""
    reader = ChainReader(codec)
    released = 0
    try:
        for raw in raws:
            for entry in reader.push(raw):
                released += 1
                _check_at_anchor(anchored, entry.seq, entry.event is not None, entry.link)
        for entry in reader.at_head():
            released += 1
            _check_at_anchor(anchored, entry.seq, entry.event is not None, entry.link)
        if anchored is not None and anchored.seq > len(raws):
            raise ChainBroken(
                len(raws) + 1,
                f"the event log ends at #{len(raws)} but its anchor is at #{anchored.seq}: "
                "entries were cut from its end or the log was replaced",
            )
    except ChainBroken as exc:
        return Verification(len(raws), released, reader.foreign, exc)
    return Verification(len(raws), released, reader.foreign, None)


def _check_at_anchor(anchored: Anchored | None, seq: int, stored: bool, link: str) -> None:
    """`link`: the entry's own (a batch released behind a gap moves the reader's on)."""
    if anchored is not None and seq == anchored.seq and stored and link != anchored.link:
        raise ChainBroken(seq, "the entry is not the one anchored: another log is in its place")


async def verify_log(event_log: EventLog) -> Verification:
    codec = _codec(event_log)
    anchored = await _anchor(event_log, codec).read_past_strangers()
    return verify_raw(codec, await read_raw(event_log), anchored)


def plan_repair(codec: EventCodec, raws: list[Raw]) -> tuple[LogRepaired, str] | None:
    """The repair that makes `raws` read to the head, and the link its event follows;
    None if the chain is not broken."""
    lost: set[int] = set()
    relinked: set[int] = set()
    for _ in range(2 * len(raws) + 1):  # each round accepts at least one more position
        assume = LogRepaired(
            at=time.time(), lost=tuple(sorted(lost)), relinked=tuple(sorted(relinked))
        )
        reader = ChainReader(codec, assume=assume)
        try:
            for raw in raws:
                reader.push(raw)
            reader.at_head()
        except ChainBroken as exc:
            before = len(lost) + len(relinked)
            _accept(codec, raws, exc.seq, lost, relinked)
            if len(lost) + len(relinked) == before:
                raise StorageError("repair", f"cannot accept the break: {exc}") from None
            continue
        if not lost and not relinked:
            return None
        return assume, reader.link
    raise StorageError("repair", "the log did not come right")


def _accept(
    codec: EventCodec, raws: list[Raw], seq: int, lost: set[int], relinked: set[int]
) -> None:
    """Accept the break at `seq`: a run of gaps as lost (and the entry after it relinked),
    or an entry of ours as relinked."""
    index = seq - 1
    if raws[index].body is not None:
        relinked.add(seq)
        return
    while index < len(raws) and raws[index].body is None:
        lost.add(raws[index].seq)
        index += 1
    for raw in raws[index:]:
        if raw.body is not None and codec.authentic(raw.seq, raw.body, raw.headers):
            relinked.add(raw.seq)
            return
        if raw.body is None:
            lost.add(raw.seq)


async def repair_log(
    event_log: EventLog, *, admin_key: str, reason: str, signer: SigningKey | None = None
) -> Appended | None:
    """Append the `LogRepaired` that accepts the log's breaks (and a log cut back behind
    its anchor), then move the anchor to it; None if there is nothing to repair.

    `signer` (AUDIT_SIGNING_SEED) makes that anchor a signed backend checkpoint, as `run`
    writes them: an audit export then has one at the repaired log's head (the positions
    the repair lost still fail against the checkpoints signed before: that is its record).

    Positional like every append: if anything was appended meanwhile it fails and is run
    again on the newer log.
    """
    codec = _codec(event_log)
    anchor = _anchor(event_log, codec, signer)
    await anchor.ensure()
    try:
        anchored = await anchor.read_past_strangers()
    except AnchorForged:
        anchored = None  # replaced below, on the record
    raws = await read_raw(event_log)
    planned = plan_repair(codec, raws)
    if planned is None:
        if verify_raw(codec, raws, anchored).broken is None:
            return None
        reader = ChainReader(codec)  # the chain reads whole: only the anchor is behind
        for raw in raws:
            reader.push(raw)
        reader.at_head()
        repair, link = LogRepaired(at=0.0), reader.link
    else:
        repair, link = planned
    event = LogRepaired(
        at=time.time(),
        admin_key=admin_key,
        lost=repair.lost,
        relinked=repair.relinked,
        reason=reason,
        anchor_seq=anchored.seq if anchored is not None else 0,
    )
    appended = await event_log.append(event, expected_last_seq=len(raws), previous=link)
    await anchor.reset(appended.seq, appended.link)
    return appended


def _anchor(event_log: EventLog, codec: EventCodec, signer: SigningKey | None = None) -> Anchor:
    return Anchor(
        event_log.nc, backend_name=event_log.backend_name, barrier=codec.barrier, signer=signer
    )


def _codec(event_log: EventLog) -> EventCodec:
    if event_log.codec is None:
        raise StorageError("verify", "the encryption key is needed to verify the event log")
    return event_log.codec
