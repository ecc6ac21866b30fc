"""A backend waits on a key rotation's swap by its events, not by polling.

`actors.swapwatch.SwapSignals` wakes on the server's advisories (the live log created or
deleted, staging deleted) and on an entry arriving at a watched position of the live
log; every wait is bounded by a fallback, so a missed event cannot hang a backend. The
first tests drive each event by hand on a real nats-server, with a fallback far longer
than the test's own time limit, so a wake can only have come from the event. The last
two run a real online rotation with the backend's fallback set to ten minutes: the
backend following the fence and the backend started mid-swap both finish within the
test's limit, so they were woken by the swap's steps. One test runs the watch as the
backend role under the shipped permissions profile: the advisories arrive, and the
server logs no violation.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

import actors.keyswitch
from actors.backend import Backend
from actors.swapwatch import SwapSignals
from events.log import EventLog
from secrets_nats_kv import streams
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.app.permissions import render_conf, user_name
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.permissions import NatsRole, inbox_prefix
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, backend_config, running_backend
from support.leakcheck import remembered
from support.rotation import NAMES, new_key, remembered_keys, rotate_cli

if TYPE_CHECKING:
    from conftest import MakeNatsServer

pytestmark = pytest.mark.anyio

LIVE = streams.events_stream(NAMES.name)
STAGING = streams.staging_stream(NAMES.name)
MARKER_SUBJECT = f"{streams.events_subject_prefix(NAMES.name)}.key"
NEVER = 600.0  # a fallback no test waits for: a wake before it is the event's
LIMIT = 20.0  # each wait's own bound in these tests


async def connected(options: NatsOptions) -> NATS:
    return await connect(options, name="swap signals test", persistent=False)


async def make_live_log(nc: NATS) -> None:
    await EventLog(nc, backend_name=NAMES.name, barrier=Barrier(XKey.generate())).ensure()


async def publish(nc: NATS, count: int) -> int:
    """`count` entries on the live log's marker subject; the last one's position."""
    seq = 0
    for _ in range(count):
        seq = (await nc.jetstream().publish(MARKER_SUBJECT, b"entry", stream=LIVE)).seq
    return seq


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await connected(NatsOptions(servers=(nats_server.url,)))
    try:
        yield conn
    finally:
        await conn.close()


async def test_an_entry_at_the_watched_position_wakes_the_wait(nc: NATS) -> None:
    await make_live_log(nc)
    last = await publish(nc, 2)
    async with SwapSignals(nc, NAMES) as signals:
        with anyio.fail_after(LIMIT):
            await signals.changed(1, within=NEVER)  # an entry already there: at once
        async with anyio.create_task_group() as tg:
            woke = anyio.Event()

            async def wait() -> None:
                await signals.changed(last + 1, within=NEVER)
                woke.set()

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert not woke.is_set()  # nothing after `last` yet
            await publish(nc, 1)
            with anyio.fail_after(LIMIT):
                await woke.wait()
    assert signals.advisories == 0  # the entry woke it, not an advisory


async def test_the_log_deleted_and_recreated_wakes_each_step_and_the_watch_follows(
    nc: NATS,
) -> None:
    """The swap's order: a watch on the old log, the log deleted, created again, and the
    awaited entry written into the new log: each step wakes the waiter."""
    await make_live_log(nc)
    last = await publish(nc, 3)
    async with SwapSignals(nc, NAMES) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(nc.jetstream().delete_stream, LIVE)
            with anyio.fail_after(LIMIT):
                await signals.changed(last + 1, within=NEVER)  # the deletion
        assert signals.advisories == 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(make_live_log, nc)
            with anyio.fail_after(LIMIT):
                await signals.changed(1, within=NEVER)  # no log to watch: its creation
        assert signals.advisories == 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish, nc, 1)
            with anyio.fail_after(LIMIT):
                await signals.changed(1, within=NEVER)  # the new log's first entry
        assert signals.advisories == 2


async def test_the_staging_stream_deleted_wakes_the_wait(nc: NATS) -> None:
    config = api.StreamConfig(name=STAGING, subjects=[streams.staging_subjects(NAMES.name)])
    await nc.jetstream().add_stream(config)
    async with SwapSignals(nc, NAMES) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(nc.jetstream().delete_stream, STAGING)
            with anyio.fail_after(LIMIT):
                await signals.changed(None, within=NEVER)
        assert signals.advisories == 1


async def test_without_an_event_the_wait_ends_at_its_fallback(nc: NATS) -> None:
    """A missed advisory costs at most the fallback: the caller then looks again."""
    await make_live_log(nc)
    last = await publish(nc, 1)
    async with SwapSignals(nc, NAMES) as signals:
        with anyio.fail_after(LIMIT):
            await signals.changed(last + 1, within=0.2)
            await signals.changed(None, within=0.2)
        assert signals.advisories == 0
        assert await nc.jetstream().stream_info(LIVE)  # nothing changed it


async def test_the_backend_role_receives_the_advisories_under_the_profile(
    make_nats_server: MakeNatsServer,
) -> None:
    passwords = {role: secrets.token_urlsafe(16) for role in NatsRole}
    credentials = {
        role: f"user: {json.dumps(user_name(role))}, password: {json.dumps(passwords[role])}"
        for role in NatsRole
    }
    server = make_nats_server(extra_conf=render_conf(NAMES, list(NatsRole), credentials))

    def options(role: NatsRole) -> NatsOptions:
        return NatsOptions(
            servers=(server.url,),
            user=user_name(role),
            password=passwords[role],
            inbox_prefix=inbox_prefix(NAMES, role),
        )

    backend, admin = (
        await connected(options(NatsRole.BACKEND)),
        await connected(options(NatsRole.ADMIN)),
    )
    try:
        await make_live_log(backend)
        last = await publish(backend, 1)
        async with SwapSignals(backend, NAMES) as signals:
            async with anyio.create_task_group() as tg:  # the backend's watch on the log
                tg.start_soon(publish, backend, 1)
                with anyio.fail_after(LIMIT):
                    await signals.changed(last + 1, within=NEVER)
            async with anyio.create_task_group() as tg:  # the rotation deletes the log
                tg.start_soon(admin.jetstream().delete_stream, LIVE)
                with anyio.fail_after(LIMIT):
                    await signals.changed(last + 2, within=NEVER)
            async with anyio.create_task_group() as tg:  # ... and creates it again
                tg.start_soon(make_live_log, admin)
                with anyio.fail_after(LIMIT):
                    await signals.changed(1, within=NEVER)
            assert signals.advisories == 2
    finally:
        await backend.close()
        await admin.close()
    log_text = server.config.log_file.read_text(errors="replace")
    assert [line for line in log_text.splitlines() if "Violation" in line] == []


# --- a real online rotation, with the backend's fallback out of reach --------------------------


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's waits end only on an event (within the test's limits)."""
    monkeypatch.setattr(actors.keyswitch, "FALLBACK_S", NEVER)


async def test_a_fenced_backend_switches_on_the_swaps_events(
    nats_server: NatsServer, no_fallback: None
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    async with running_backend(url, keys, next_encryption_key=new) as clients:
        reader = Identity()
        before = remembered("fenced-before", "secret value")
        await clients.admin.put_secret("db", before)
        await clients.admin.add_mapping(reader.entity_key, ["db"])
        with anyio.fail_after(120):
            done = await rotate_cli(url, keys.encryption, new, "--online")
        assert done.returncode == 0, done.stderr
        line = done.stdout.decode()
        assert "not yet serving under the new key" not in line, line  # switched in time
        public_keys = clients.backend.status()["public_keys"]
        assert isinstance(public_keys, dict)
        assert public_keys["encryption"] == new.public_key
        assert (await clients.get(reader, "db")).value_bytes() == before.encode()
        revision = await clients.admin.put_secret("db", remembered("fenced-after", "secret value"))
        assert revision == 2


class _Waiting(logging.Handler):
    """Sets `seen` when the backend logs that it waits for a swap to finish."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for it to finish" in record.getMessage():
            self.seen.set()


@pytest.fixture
def waiting() -> Iterator[_Waiting]:
    handler, logger = _Waiting(), logging.getLogger("actors.keyswitch")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_backend_started_mid_swap_is_woken_by_the_swaps_events(
    nats_server: NatsServer, no_fallback: None, waiting: _Waiting
) -> None:
    """Stopped after the refill, re-run: the live log is deleted, recreated and refilled
    again, then the marker; the waiting backend follows each step and starts."""
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    async with running_backend(url, keys) as clients:
        await clients.admin.put_secret("db", remembered("mid-swap", "secret value"))
    filled = await rotate_cli(url, keys.encryption, new, "--online", crash_at="filled")
    assert filled.returncode == 1, filled.stderr
    backend = Backend(backend_config(url, keys, next_encryption_key=new))
    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run)
        with anyio.fail_after(LIMIT):
            await waiting.seen.wait()
        assert not backend.ready.is_set()
        done = await rotate_cli(url, keys.encryption, new, "--online")
        assert done.returncode == 0, done.stderr
        with anyio.fail_after(60):
            await backend.ready.wait()
        public_keys = backend.status()["public_keys"]
        assert isinstance(public_keys, dict)
        assert public_keys["encryption"] == new.public_key
        backend.stop()
    async with running_backend(url, Keys(transit=keys.transit, encryption=new)) as clients:
        assert [s.name for s in await clients.admin.list_secrets()] == ["db"]
