"""One conformance suite for the event log, run against every implementation of it.

`events.log.EventLog` (a JetStream stream, tests/nats/test_log_conformance.py) and
`support.memlog.MemoryEventLog` (tests/unit/test_memlog.py) must behave alike where the
actors depend on them: appends land at exactly the expected position or raise
`ConcurrentAppend`; a message id seen before answers with the first append; reads come
in order with erased entries as gaps (`event is None`); erasing is idempotent; the head
is the last position written; a follower sees appends made after it started.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from events.log import ConcurrentAppend
from events.types import MappingAdded, SecretDeleted, SecretPut

AT = 1_700_000_000.0
Check = Callable[[Any], Awaitable[None]]


def _put(name: str) -> SecretPut:
    return SecretPut(name=name, sealed=b"sealed-" + name.encode(), at=AT)


async def appends_land_at_the_expected_position(log: Any) -> None:
    assert await log.head() == 0
    first = await log.append(_put("a"), expected_last_seq=0)
    second = await log.append(SecretDeleted(name="a", at=AT), expected_last_seq=1)
    assert (first.seq, first.duplicate, second.seq, second.duplicate) == (1, False, 2, False)
    assert await log.head() == 2


async def a_taken_position_raises_and_writes_nothing(log: Any) -> None:
    await log.append(_put("a"), expected_last_seq=0)
    for stale in (0, 5):
        try:
            await log.append(_put("b"), expected_last_seq=stale)
        except ConcurrentAppend:
            pass
        else:
            raise AssertionError(f"an append expecting {stale} after 1 landed")
    assert await log.head() == 1


async def a_repeated_message_id_answers_with_the_first_append(log: Any) -> None:
    first = await log.append(_put("a"), expected_last_seq=0, msg_id="request-1")
    again = await log.append(_put("a"), expected_last_seq=1, msg_id="request-1")
    assert (again.seq, again.duplicate) == (first.seq, True)
    assert await log.head() == 1


async def reads_are_ordered_with_erased_entries_as_gaps(log: Any) -> None:
    events = [_put("a"), _put("b"), MappingAdded(entity="e", secrets=("a",), at=AT), _put("c")]
    for seq, event in enumerate(events):
        await log.append(event, expected_last_seq=seq)
    await log.erase(2)
    await log.erase(2)  # erasing again is fine
    await log.erase(99)  # so is erasing what was never written
    entries = [entry async for entry in log.entries()]
    assert [entry.seq for entry in entries] == [1, 2, 3, 4]
    assert [entry.event for entry in entries] == [events[0], None, events[2], events[3]]
    tail = [entry.seq async for entry in log.entries(from_seq=3)]
    assert tail == [3, 4]
    assert await log.head() == 4


async def a_follower_sees_later_appends(log: Any) -> None:
    await log.append(_put("a"), expected_last_seq=0)
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
            await log.append(_put("b"), expected_last_seq=1)
    assert seen == [1, 2]


CHECKS: dict[str, Check] = {
    check.__name__: check
    for check in (
        appends_land_at_the_expected_position,
        a_taken_position_raises_and_writes_nothing,
        a_repeated_message_id_answers_with_the_first_append,
        reads_are_ordered_with_erased_entries_as_gaps,
        a_follower_sees_later_appends,
    )
}
