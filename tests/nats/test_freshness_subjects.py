"""Per-get freshness on a real server: a backlog holds only the gets that depend on it.

The live view is the real one over the real event log; its follower is held at a gate
(`GatedLog`), so the view stands behind the head for as long as the test says, with no
timing involved. Junk published on the log's own subject `secret.junk` (stored, and
rejected by the fold) and a write after it then show: a get of a secret the backlog does
not touch is served from the view as it stands, before the view has read any of it; a
get of the secret written after the backlog waits for exactly that write (not the head,
which is more junk further on); and a stranger answering the view's reads of the last
entries with an older sequence (a replay) or an impossible one is noticed, and never
makes a get wait for less than the last write it depends on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events.log import EventLog, LogEntry, secret_subject
from events.types import Event, MappingAdded, SecretPut
from projections.live import LiveView
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import msg_get_subject
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.harness import fresh_names

pytestmark = pytest.mark.anyio

BACKLOG = 300  # junk entries the view has not read when the gets arrive


class GatedLog(EventLog):
    """The real log, whose live follower waits at `gate` (catching up is not held)."""

    gate: anyio.Event

    async def entries(
        self, *, from_seq: int = 1, link: str = GENESIS, follow: bool = False
    ) -> AsyncGenerator[LogEntry, None]:
        if follow:
            await self.gate.wait()
        async for entry in super().entries(from_seq=from_seq, link=link, follow=follow):
            yield entry


class Written:
    """The log as the test writes it: positions and links, through the real codec."""

    def __init__(self, log: EventLog) -> None:
        self.log, self.seq, self.link = log, 0, GENESIS

    async def append(self, event: Event) -> int:
        appended = await self.log.append(event, expected_last_seq=self.seq, previous=self.link)
        self.seq, self.link = appended.seq, appended.link
        return self.seq

    async def junk(self, count: int) -> None:
        """Untagged messages on `secret.junk`, each acknowledged (stored) by JetStream."""
        js = self.log.nc.jetstream()
        for _ in range(count):
            ack = await js.publish(
                secret_subject(self.log.prefix, "junk"), b"junk", stream=self.log.stream
            )
            self.seq = ack.seq


def put(name: str) -> SecretPut:
    return SecretPut(name=name, sealed=b"xkv1" + name.encode().ljust(40, b"."), at=time.time())


class Scene:
    """A gated view behind a junk backlog: `a` written before it, `b` after it."""

    def __init__(self, nc: NATS, incidents: list[str]) -> None:
        names = fresh_names()
        self.log = GatedLog(nc, backend_name=names.name, barrier=Barrier(XKey.generate()))
        self.log.gate = anyio.Event()
        self.written = Written(self.log)
        self.entity = SigningKey.generate(Role.MODULE).public_key
        self.view = LiveView(self.log, on_forged_head=incidents.append)
        self.targets: list[int] = []  # what each get behind the head waited for
        self.waiting = anyio.Event()
        real = self.view.wait_applied

        async def spy(seq: int) -> None:
            self.targets.append(seq)
            self.waiting.set()
            await real(seq)

        self.view.wait_applied = spy  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.log.ensure()
        await self.written.append(put("a"))
        await self.written.append(MappingAdded(entity=self.entity, secrets=("a", "b"), at=1.0))

    async def behind(self) -> tuple[int, int]:
        """Once the view is following (at the gate): the backlog, `b`, more junk.
        Returns (`b`'s position, the head)."""
        await self.written.junk(BACKLOG)
        b_seq = await self.written.append(put("b"))
        await self.written.junk(BACKLOG // 10)
        return b_seq, self.written.seq


@pytest.fixture
async def nc(module_nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(
        NatsOptions(servers=(module_nats_server.url,)), name="freshness", persistent=False
    )
    try:
        yield client
    finally:
        await client.close()


async def test_a_junk_backlog_holds_only_the_gets_that_depend_on_it(nc: NATS) -> None:
    incidents: list[str] = []
    scene = Scene(nc, incidents)
    await scene.start()
    view = scene.view
    async with anyio.create_task_group() as tg:
        await tg.start(view.run)  # caught up (2 entries), then following: held at the gate
        b_seq, head = await scene.behind()
        assert view.applied_seq == 2 < b_seq < head

        with anyio.fail_after(10):  # an unrelated get: served from the view as it stands
            await view.wait_fresh(30.0, secret="a", entity=scene.entity)
        assert view.applied_seq == 2  # not one entry of the backlog was read for it
        assert scene.targets == [2]  # the last entry on its subjects: the mapping
        assert view.subject_reads.narrowed == 1

        done = anyio.Event()

        async def get_b() -> None:
            await view.wait_fresh(30.0, secret="b", entity=scene.entity)
            done.set()

        scene.waiting = anyio.Event()
        tg.start_soon(get_b)
        with anyio.fail_after(10):
            await scene.waiting.wait()  # it asked how far to wait, and waits
        assert scene.targets[-1] == b_seq  # for `b`, not for the junk after it
        assert not done.is_set()
        assert view.applied_seq == 2
        scene.log.gate.set()  # the follower reads on
        with anyio.fail_after(60):
            await done.wait()
        assert view.applied_seq >= b_seq
        latest = view.state.secrets["b"].latest()
        assert latest is not None
        assert latest.event_seq == b_seq

        # A read with no subjects (a write's decider) still waits for the whole head.
        with anyio.fail_after(60):
            await view.wait_fresh(60.0)
        assert view.applied_seq >= head
        assert incidents == []  # JetStream alone answered
        tg.cancel_scope.cancel()


async def forging_last_entries(nc: NATS, stream: str, answered: list[str]) -> None:
    """Answer every MSG.GET by subject of `stream` as a stranger would: each subject's last
    entry at sequence 1 (a replay of the oldest entry; for the mapping, below what the view
    folded). A higher one would only make gets wait, at most for the head."""

    async def answer(msg: Msg) -> None:
        subject = msgspec.json.decode(msg.data)["last_by_subj"]
        seq = 1  # the oldest entry: a replay
        await nc.publish(
            msg.reply, msgspec.json.encode({"message": {"subject": subject, "seq": seq}})
        )
        await nc.flush()
        answered.append(subject)

    await nc.subscribe(msg_get_subject(stream), cb=answer)
    await nc.flush()


async def test_forged_last_entry_answers_never_shorten_a_get_s_wait(
    nc: NATS, module_nats_server: NatsServer
) -> None:
    incidents: list[str] = []
    scene = Scene(nc, incidents)
    await scene.start()
    view = scene.view
    forger = await connect(
        NatsOptions(servers=(module_nats_server.url,)), name="forger", persistent=False
    )
    answered: list[str] = []
    try:
        await forging_last_entries(forger, scene.log.stream, answered)
        async with anyio.create_task_group() as tg:
            await tg.start(view.run)
            b_seq, head = await scene.behind()
            # Gets of `a` are safe whoever answers; they show the view what goes on (the
            # very first may take the forger's answer if it came first: its rival's is
            # counted when it arrives, and the next read knows).
            for _ in range(5):
                with anyio.fail_after(10):
                    await view.wait_fresh(30.0, secret="a", entity=scene.entity)
                if incidents:
                    break
            assert answered
            assert incidents
            assert "last entries" in incidents[-1]
            assert view.applied_seq == 2

            done = anyio.Event()

            async def get_b() -> None:
                await view.wait_fresh(30.0, secret="b", entity=scene.entity)
                done.set()

            scene.waiting = anyio.Event()
            tg.start_soon(get_b)
            with anyio.fail_after(10):
                await scene.waiting.wait()
            # The replayed sequence 1 lost to JetStream's own answer: the get waits for `b`.
            assert scene.targets[-1] == b_seq < head
            assert not done.is_set()
            scene.log.gate.set()
            with anyio.fail_after(60):
                await done.wait()
            latest = view.state.secrets["b"].latest()
            assert latest is not None
            assert latest.event_seq == b_seq
            tg.cancel_scope.cancel()
    finally:
        await forger.close()
