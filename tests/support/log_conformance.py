"""One conformance suite for the event log, run against every implementation of it.

`events.log.EventLog` (a JetStream stream, tests/nats/test_log_conformance.py) and
`support.memlog.MemoryEventLog` (tests/unit/test_memlog.py) must behave alike where the
actors depend on them: appends land at exactly the expected position or raise
`ConcurrentAppend`, each linked to the one before (`previous`); a message id seen before
answers with the first append; reads come in order with entries a destroy erased as gaps
(`event is None`), while an entry erased that no destroy names breaks the chain
(`ChainBroken`); erasing is idempotent; the head is the last position written; a
follower sees appends made after it started.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from events.chain import ChainBroken
from events.log import ConcurrentAppend
from events.types import MappingAdded, SecretDeleted, SecretDestroyed, SecretPut
from secrets_nats_kv.barrier import GENESIS

AT = 1_700_000_000.0
Check = Callable[[Any], Awaitable[None]]


def _put(name: str) -> SecretPut:
    return SecretPut(name=name, sealed=b"sealed-" + name.encode(), at=AT)


async def appends_land_at_the_expected_position(log: Any) -> None:
    assert await log.head() == 0
    first = await log.append(_put("a"), expected_last_seq=0, previous=GENESIS)
    second = await log.append(
        SecretDeleted(name="a", at=AT), expected_last_seq=1, previous=first.link
    )
    assert (first.seq, first.duplicate, second.seq, second.duplicate) == (1, False, 2, False)
    assert first.link != second.link
    assert [entry.link async for entry in log.entries()] == [first.link, second.link]
    assert await log.head() == 2


async def a_taken_position_raises_and_writes_nothing(log: Any) -> None:
    first = await log.append(_put("a"), expected_last_seq=0, previous=GENESIS)
    for stale in (0, 5):
        try:
            await log.append(_put("b"), expected_last_seq=stale, previous=first.link)
        except ConcurrentAppend:
            pass
        else:
            raise AssertionError(f"an append expecting {stale} after 1 landed")
    assert await log.head() == 1


async def a_repeated_message_id_answers_with_the_first_append(log: Any) -> None:
    first = await log.append(_put("a"), expected_last_seq=0, previous=GENESIS, msg_id="request-1")
    again = await log.append(
        _put("a"), expected_last_seq=1, previous=first.link, msg_id="request-1"
    )
    assert (again.seq, again.duplicate) == (first.seq, True)
    assert await log.head() == 1


async def _fill(log: Any, events: list[Any]) -> str:
    link = GENESIS
    for seq, event in enumerate(events):
        link = (await log.append(event, expected_last_seq=seq, previous=link)).link
    return link


async def reads_are_ordered_with_erased_entries_as_gaps(log: Any) -> None:
    events = [_put("a"), _put("b"), MappingAdded(entity="e", secrets=("a",), at=AT), _put("c")]
    link = await _fill(log, events)
    erased = [entry async for entry in log.entries()][1]
    destroy = SecretDestroyed(
        name="b", erased_seqs=(2,), erased_digests=(erased.digest,), all=True, at=AT
    )
    await log.append(destroy, expected_last_seq=4, previous=link)
    await log.erase(2)
    await log.erase(2)  # erasing again is fine
    await log.erase(99)  # so is erasing what was never written
    entries = [entry async for entry in log.entries()]
    assert [entry.seq for entry in entries] == [1, 2, 3, 4, 5]
    assert [entry.event for entry in entries] == [events[0], None, *events[2:], destroy]
    # Read on from an entry of ours, with its link (a gap has none: its bytes are gone).
    tail = [entry.seq async for entry in log.entries(from_seq=4, link=entries[2].link)]
    assert tail == [4, 5]
    assert await log.head() == 5


async def an_entry_erased_without_a_destroy_breaks_the_chain(log: Any) -> None:
    await _fill(log, [_put("a"), MappingAdded(entity="e", secrets=("a",), at=AT), _put("c")])
    await log.erase(2)  # as anyone on the bus could delete the mapping
    with pytest.raises(ChainBroken) as broken:
        [entry async for entry in log.entries()]
    assert broken.value.seq == 2


async def a_follower_sees_later_appends(log: Any) -> None:
    first = await log.append(_put("a"), expected_last_seq=0, previous=GENESIS)
    seen: list[int] = []
    started = anyio.Event()

    async def follow() -> None:
        async for entry in log.entries(follow=True):
            seen.append(entry.seq)
            started.set()
            if entry.seq == 2:
                return

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await started.wait()
            await log.append(_put("b"), expected_last_seq=1, previous=first.link)
    assert seen == [1, 2]


CHECKS: dict[str, Check] = {
    check.__name__: check
    for check in (
        appends_land_at_the_expected_position,
        a_taken_position_raises_and_writes_nothing,
        a_repeated_message_id_answers_with_the_first_append,
        reads_are_ordered_with_erased_entries_as_gaps,
        an_entry_erased_without_a_destroy_breaks_the_chain,
        a_follower_sees_later_appends,
    )
}
