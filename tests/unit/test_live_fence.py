"""The live view at an online rotation's fence, over the in-memory log (no server).

The view is the real `LiveView` and the log the real codec and chain reader
(`support.memlog`); the swap is played by the test: the stream's entries replaced by a
copy re-tagged under the new key, as `rotate-key --online` leaves it. What is checked
is the view's side of the contract: it stops at a fence its follower says to wait at,
folds nothing meanwhile, answers reads from the state as it stands, follows on when the
fence is lifted, and after `rebase` follows the rewritten log under the new key from
where the fresh fold stands, handing on only the writes past its own position.
"""

from __future__ import annotations

import anyio
import pytest

from events.types import Event, FenceLifted, KeyRotated, SecretPut, WritesFenced
from projections.live import LiveView
from projections.state import Effect, PutSecretEntry, ViewState
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.xkeys import XKey
from support.memlog import MemoryEventLog

pytestmark = pytest.mark.anyio

OLD, NEW = XKey.generate(), XKey.generate()


def put(name: str, label: str) -> SecretPut:
    return SecretPut(name=name, sealed=b"xkv1" + label.encode().ljust(40, b"."), at=1.0)


async def append(log: MemoryEventLog, event: Event, previous: str) -> str:
    appended = await log.append(event, expected_last_seq=await log.head(), previous=previous)
    return appended.link


class Swap:
    """The test's side of the fence: what it lets the view do next."""

    def __init__(self) -> None:
        self.waiting = anyio.Event()  # the view stands at a fence
        self.go = anyio.Event()
        self.then: object = None  # what to do when `go` is set: None (lifted) or a rebase

    def pauses(self, state: ViewState) -> bool:
        return state.fence is not None and state.fence.new_key == NEW.public_key

    async def follow(self, view: LiveView) -> None:
        self.waiting.set()
        await self.go.wait()
        if callable(self.then):
            await self.then(view)


async def test_the_view_stands_at_the_fence_then_follows_the_lifted_log() -> None:
    log = MemoryEventLog(Barrier(OLD, NEW))
    swap = Swap()
    effects: list[int] = []
    view = LiveView(log, fences=swap, on_effects=lambda seq, _: effects.append(seq))  # type: ignore[arg-type]
    link = await append(log, put("a", "v1"), GENESIS)
    link = await append(log, WritesFenced(new_key=NEW.public_key, rotation="r", at=1.0), link)
    async with anyio.create_task_group() as tg:
        await tg.start(view.run)
        with anyio.fail_after(5):
            await swap.waiting.wait()
        assert view.paused
        link = await append(log, FenceLifted(rotation="r", at=1.0), link)
        assert view.state.last_seq == 2  # nothing is folded while the view stands
        with anyio.fail_after(1):
            await view.wait_fresh(0.0)  # the log is ahead, yet the state as it stands serves
        swap.go.set()
        with anyio.fail_after(5):
            await view.wait_applied(3)
        assert not view.paused
        assert view.state.fence is None
        await append(log, put("a", "v2"), link)
        with anyio.fail_after(5):
            await view.wait_applied(4)
        tg.cancel_scope.cancel()
    assert effects == [1, 2, 3, 4]


async def test_a_fence_the_follower_does_not_stop_at_is_followed_through() -> None:
    log = MemoryEventLog(Barrier(OLD))
    swap = Swap()
    view = LiveView(log, fences=swap)  # type: ignore[arg-type]
    link = await append(
        log, WritesFenced(new_key=XKey.generate().public_key, rotation="r", at=1.0), GENESIS
    )
    async with anyio.create_task_group() as tg:
        await tg.start(view.run)
        await append(log, put("a", "v1"), link)
        with anyio.fail_after(5):
            await view.wait_applied(2)
        assert not swap.waiting.is_set()
        tg.cancel_scope.cancel()


async def test_after_a_rebase_the_view_follows_the_rewritten_log_under_the_new_key() -> None:
    barrier = Barrier(OLD, NEW)
    log = MemoryEventLog(barrier)
    history: list[Event] = [
        put("a", "v1"),
        put("b", "v1"),
        WritesFenced(new_key=NEW.public_key, rotation="r", at=1.0),
    ]
    link = GENESIS
    for event in history:
        link = await append(log, event, link)
    # The rotated log: the same positions re-tagged under the new key, its marker last.
    rotated = MemoryEventLog(Barrier(NEW))
    new_link = GENESIS
    for event in [*history, KeyRotated(old_key=OLD.public_key, new_key=NEW.public_key, at=2.0)]:
        new_link = await append(rotated, event, new_link)
    handed: list[tuple[int, list[Effect]]] = []
    swap = Swap()
    view = LiveView(log, fences=swap, on_effects=lambda seq, e: handed.append((seq, e)))  # type: ignore[arg-type]

    async def switch(view: LiveView) -> None:
        start = view.state.last_seq
        tail: list[tuple[int, list[Effect]]] = []

        def keep(seq: int, effects: list[Effect]) -> None:
            if seq > start:
                tail.append((seq, effects))

        fresh = LiveView(rotated, on_effects=keep)  # type: ignore[arg-type]
        await fresh.catch_up()
        log.stored = list(rotated.stored)  # the swap: the stream deleted, refilled
        barrier.adopt(NEW.public_key)
        view.rebase(fresh, tail)

    swap.then = switch
    async with anyio.create_task_group() as tg:
        await tg.start(view.run)
        with anyio.fail_after(5):
            await swap.waiting.wait()
        swap.go.set()
        with anyio.fail_after(5):
            await view.wait_applied(4)
        assert view.state.encryption_key == NEW.public_key
        assert view.state.fence is None
        assert view.link == new_link
        # A write after the switch: encoded under the new key, folded on the new chain.
        await append(log, put("a", "v2"), view.link)
        with anyio.fail_after(5):
            await view.wait_applied(5)
        tg.cancel_scope.cancel()
    assert [seq for seq, _ in handed] == [1, 2, 3, 4, 5]  # 4 from the fresh fold, once
    assert handed[-1][1] == [PutSecretEntry("a", 3, put("a", "v2").sealed, "string")]
    assert view.broken is None
