"""A fenced backend folds the committed staging stream while the swap refills the log.

The log here has every kind of position a rotation carries (versions, deletes, destroys
as gaps, mappings, a forged entry kept as a rejected placeholder: `support.rotation`'s
`populate`). The backend following the online rotation must switch to the fold of
staging (its log line says so), and that fold must be exactly the fold of the rewritten
live log a restarted backend makes: same state, same chain link. The check that accepts
a staged fold is driven on a real committed staging stream (the rotation stopped after
its refill): the anchor at the marker with the fold's link passes; another link, an
anchor short of the marker, no anchor, or a staging stream for another key do not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio
import pytest

from actors.prefold import StagedFold
from actors.rotation import staging_stream_name
from events.anchor import Anchored
from events.log import EventLog
from projections.live import LiveView
from secrets_nats_kv.barrier import CHAIN_HEADER, Barrier
from secrets_nats_kv.nats.reader import get_message
from secrets_nats_kv.xkeys import XKey
from support.harness import running_backend
from support.leakcheck import remembered
from support.rotation import (
    NAMES,
    client,
    head,
    new_key,
    populate,
    remembered_keys,
    rotate_cli,
    serves_everything,
)

if TYPE_CHECKING:
    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio


class _Switches(logging.Handler):
    """The backend's "encryption key rotated" lines: whether each took the staged fold."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.folded_ahead: list[bool] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("encryption key rotated"):
            self.folded_ahead.append(bool(getattr(record, "folded_ahead", False)))


@pytest.fixture
def switches() -> Iterator[_Switches]:
    handler, logger = _Switches(), logging.getLogger("actors.keyswitch")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_the_switch_takes_the_staged_fold_and_it_is_the_live_logs_fold(
    nats_server: NatsServer, switches: _Switches
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    async with running_backend(url, keys, next_encryption_key=new) as clients:
        async with client(url) as nc:
            model = await populate(clients, nc)
        with anyio.fail_after(120):
            done = await rotate_cli(url, keys.encryption, new, "--online")
        assert done.returncode == 0, done.stderr
        assert switches.folded_ahead == [True]
        view = clients.backend.view
        assert view is not None
        async with client(url) as nc:
            live = LiveView(EventLog(nc, backend_name=NAMES.name, barrier=Barrier(new)))
            await live.catch_up()  # what a backend restarted on the rewritten log folds
        assert view.state == live.state
        assert (view.link, view.digests) == (live.link, live.digests)
        # It serves on and writes under the new key, from the fold it took.
        name, value = next(iter(model.values)), remembered("after-switch", "secret value")
        revision = await clients.admin.put_secret(name, value)
        assert revision > max(model.values[name])
        model.put(name, revision, value)
        model.deleted.discard(name)
    await serves_everything(url, new, model)


async def test_a_staged_fold_is_taken_only_for_the_log_the_rotation_anchored(
    nats_server: NatsServer,
) -> None:
    url, keys, new = nats_server.url, remembered_keys(), new_key()
    async with running_backend(url, keys) as clients, client(url) as nc:
        await populate(clients, nc)
    filled = await rotate_cli(url, keys.encryption, new, "--online", crash_at="filled")
    assert filled.returncode == 1, filled.stderr  # committed, refilled, no anchor or marker
    async with client(url) as nc:
        staging = staging_stream_name(NAMES.name)
        marker_seq = await head(nc, staging)
        marker = await get_message(nc, staging, marker_seq)
        assert marker is not None
        link = marker.headers[CHAIN_HEADER]
        fence = marker_seq - 1

        other = StagedFold(nc, NAMES, Barrier(XKey.generate()), fence)
        assert not await other.committed()  # staging is for `new`, not this key

        staged = StagedFold(nc, NAMES, Barrier(new), fence)
        assert await staged.committed()
        with anyio.fail_after(60):
            await staged.run()
        assert staged.done.is_set()
        assert staged.view is not None
        assert (staged.view.state.last_seq, staged.view.link) == (marker_seq, link)
        assert staged.view.state.encryption_key == new.public_key
        assert [seq for seq, _ in staged.tail] == [marker_seq]  # only the marker is new

        assert staged.matches(Anchored(seq=marker_seq, link=link), marker_seq, link)
        # A backend that switched first wrote after the marker: the anchor moved on.
        assert staged.matches(Anchored(seq=marker_seq + 2, link="later"), marker_seq, link)
        assert not staged.matches(None, marker_seq, link)  # the anchor not reset yet
        assert not staged.matches(Anchored(seq=marker_seq, link="other"), marker_seq, link)
        assert not staged.matches(Anchored(seq=fence, link=link), marker_seq, link)
        assert not staged.matches(Anchored(seq=marker_seq, link=link), marker_seq, "other")
        assert not staged.matches(Anchored(seq=marker_seq + 1, link=link), marker_seq + 1, link)
    finished = await rotate_cli(url, keys.encryption, new, "--online")
    assert finished.returncode == 0, finished.stderr
