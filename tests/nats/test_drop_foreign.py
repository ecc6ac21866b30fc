"""`repair` removes a junk flood from the event log, on the record, on a real server.

Anyone who may publish on the log's subjects can store junk in it; every start reads it
all again. `repair` appends a tagged `ForeignDropped` naming the junk's positions, then
erases them: the stream no longer holds them, a restart no longer reads them (its view
counts none), and the backend serves exactly what it served before, numbering versions
as before. A repair interrupted between its record and its erases is finished by a rerun.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING

import pytest
from nats.aio.client import Client as NATS

from events.chain import Raw
from events.drop import find_foreign
from events.log import EventLog, stream_name, subject_prefix
from events.repair import read_raw
from events.types import ForeignDropped, Rejected, as_ranges
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.app.permissions import render_conf, user_name
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.permissions import NatsRole
from secrets_nats_kv.xkeys import XKey
from support.attacks import attacker
from support.harness import Identity, Keys, cli_env, run_cli, running_backend
from support.leakcheck import remember
from support.store import log_entries

if TYPE_CHECKING:
    from conftest import MakeNatsServer

pytestmark = pytest.mark.anyio

NAME = "nats-kv"
STREAM = stream_name(NAME)
FLOOD = 1500  # junk entries per flood; two floods, around a put


async def flood(nc: NATS, count: int) -> None:
    """`count` untagged entries on a subject the log keeps, all stored when this returns:
    the last is published with an ack, and the server stores one connection's messages to
    one stream in order."""
    subject = f"{subject_prefix(NAME)}.secret.s"
    for i in range(count - 1):
        await nc.publish(subject, b"junk %d" % i)
    await nc.jetstream().publish(subject, b"junk, the last")


async def flooded_history(url: str, keys: Keys, identity: Identity) -> tuple[str, str]:
    """Two versions of `s`, junk before and after the second; the two values."""
    first, second = "first value", "second value"  # the admin client remembers them
    async with running_backend(url, keys) as clients:
        assert await clients.put_readable(identity, "s", first) == 1
    async with attacker(url) as nc:
        await flood(nc, FLOOD)
    async with running_backend(url, keys) as clients:
        assert await clients.admin.put_secret("s", second) == 2
    async with attacker(url) as nc:
        await flood(nc, FLOOD)
    return first, second


async def test_repair_drops_a_junk_flood_and_a_restart_no_longer_reads_it(
    nats_server: NatsServer,
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    first, second = await flooded_history(url, keys, identity)
    async with attacker(url) as nc:
        before = await stream_state(nc, STREAM, 5)
    async with running_backend(url, keys) as clients:
        assert clients.backend.view is not None
        assert clients.backend.view.foreign == 2 * FLOOD  # every start reads them all
    env = cli_env(keys)
    verify = run_cli("verify", "--nats-address", url, env=env)
    assert verify.returncode == 0, verify.stderr
    assert f"{2 * FLOOD} not tagged by this key skipped (repair removes them)" in (
        verify.stdout.decode()
    )

    repair = run_cli("repair", "--reason", "junk flood", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    record_seq = before.last_seq + 1
    assert repair.stdout.decode().splitlines() == [
        f"dropped {2 * FLOOD} entries not tagged by this key from the event log "
        f"(entry #{record_seq} records them)"
    ]

    async with attacker(url) as nc:
        after = await stream_state(nc, STREAM, 5)
        entries = await log_entries(nc, keys)
    assert after.messages == before.messages - 2 * FLOOD + 1
    assert after.last_seq == record_seq
    assert not [entry for entry in entries if isinstance(entry.event, Rejected)]
    record = entries[-1].event
    assert isinstance(record, ForeignDropped)
    assert record.count == 2 * FLOOD
    assert record.reason == "junk flood"
    assert len(record.ranges) == 2  # the two floods, one run each
    assert record.admin_key == keys.encryption.public_key

    async with running_backend(url, keys) as clients:
        view = clients.backend.view
        assert view is not None
        assert view.foreign == 0  # the restart read none of the junk
        assert (await clients.get(identity, "s")).string_secret == second
        assert (await clients.get(identity, "s", version="1")).string_secret == first
        assert await clients.admin.put_secret("s", "third value") == 3
    verify = run_cli("verify", "--nats-address", url, env=env)
    assert verify.returncode == 0, verify.stderr
    assert "0 not tagged by this key skipped" in verify.stdout.decode()
    audit = run_cli("audit", "export", "--nats-address", url, env=env)
    assert audit.returncode == 0, audit.stderr
    records = [json.loads(line) for line in audit.stdout.decode().splitlines()]
    dropped = [r for r in records if r["type"] == "foreign_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["counts"] == {"dropped": 2 * FLOOD}
    assert dropped[0]["reason"] == "junk flood"
    assert dropped[0]["dropped"] == [list(run) for run in record.ranges]
    assert not [r for r in records if r["type"] in ("rejected", "erased")]
    again = run_cli("repair", "--reason", "again", "--nats-address", url, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode().strip() == "event log verified: nothing to repair"


async def test_a_repair_interrupted_after_its_record_is_finished_by_a_rerun(
    nats_server: NatsServer,
) -> None:
    url, keys, identity = nats_server.url, Keys(), Identity()
    first, second = await flooded_history(url, keys, identity)
    async with attacker(url) as nc:
        # What `repair` does up to an interruption: the record, then half the erases.
        event_log = EventLog(nc, backend_name=NAME, barrier=Barrier(keys.encryption))
        raws: list[Raw] = await read_raw(event_log)
        assert event_log.codec is not None
        found = find_foreign(event_log.codec, raws)
        record = ForeignDropped(
            at=1.0, ranges=tuple(as_ranges(found.stored)), count=len(found.stored)
        )
        await event_log.append(record, expected_last_seq=found.head, previous=found.link)
        for seq in found.stored[: FLOOD // 2]:
            await event_log.erase(seq)
    async with running_backend(url, keys) as clients:
        assert clients.backend.view is not None
        assert clients.backend.view.foreign == 2 * FLOOD - FLOOD // 2  # still stored: rejected
        assert (await clients.get(identity, "s")).string_secret == second

    env = cli_env(keys)
    # Its anchor was not moved either: the entries it holds behind the gaps still verify.
    verify = run_cli("verify", "--nats-address", url, env=env)
    assert verify.returncode == 0, verify.stderr
    repair = run_cli("repair", "--reason", "finish", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    assert repair.stdout.decode().splitlines() == [
        f"dropped {2 * FLOOD - FLOOD // 2} entries not tagged by this key from the event log "
        "(an earlier repair records them)"
    ]
    async with attacker(url) as nc:
        state = await stream_state(nc, STREAM, 5)
        entries = await log_entries(nc, keys)
    assert state.last_seq == found.head + 1  # no second record: the first names them all
    assert not [entry for entry in entries if isinstance(entry.event, Rejected)]
    async with running_backend(url, keys) as clients:
        assert clients.backend.view is not None
        assert clients.backend.view.foreign == 0
        assert (await clients.get(identity, "s", version="1")).string_secret == first


async def test_the_admin_profile_may_drop_junk_and_nothing_is_refused(
    make_nats_server: MakeNatsServer,
) -> None:
    """`repair` as the admin user of the permissions profile: its record, anchor and
    erases need no grant beyond the profile's (the server logs no violation)."""
    keys, identity = Keys(), Identity()
    admin_password, writer_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    admin = f"user: {json.dumps(user_name(NatsRole.ADMIN))}, password: {json.dumps(admin_password)}"
    conf = render_conf(BackendNames(), [NatsRole.ADMIN], {NatsRole.ADMIN: admin})
    users_end = "\n  ]\n}\n"
    assert conf.endswith(users_end)
    writer = f'\n    {{ user: "writer", password: {json.dumps(writer_password)} }}'
    server = make_nats_server(extra_conf=conf.removesuffix(users_end) + writer + users_end)
    as_writer = NatsOptions(servers=(server.url,), user="writer", password=writer_password)
    async with running_backend(server.url, keys, nats=as_writer) as clients:
        assert await clients.put_readable(identity, "s", "a value") == 1
    nc = await connect(as_writer, name="junk writer", persistent=False)
    try:
        await flood(nc, 200)
    finally:
        await nc.close()

    env = cli_env(keys, NATS_PASSWORD=admin_password)
    flags = ("--nats-address", server.url, "--nats-user", user_name(NatsRole.ADMIN))
    repair = run_cli("repair", "--reason", "junk", *flags, env=env)
    assert repair.returncode == 0, repair.stderr
    assert repair.stdout.decode().startswith("dropped 200 entries not tagged by this key")
    verify = run_cli("verify", *flags, env=env)
    assert verify.returncode == 0, verify.stderr
    assert "0 not tagged by this key skipped" in verify.stdout.decode()
    log = server.config.log_file.read_text(errors="replace")
    assert [line for line in log.splitlines() if "Violation" in line] == []


async def test_a_log_rid_of_its_junk_rotates_to_a_new_key(nats_server: NatsServer) -> None:
    """`rotate-key` copies the dropped positions as gaps; the rotated log's rebuild counts
    no revision there (`actors.rotation.swap`), so versions keep their numbers."""
    url, keys, identity = nats_server.url, Keys(), Identity()
    first, second = await flooded_history(url, keys, identity)
    env = cli_env(keys)
    repair = run_cli("repair", "--reason", "junk", "--nats-address", url, env=env)
    assert repair.returncode == 0, repair.stderr
    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    rotate_env = {**env, "NEW_ENCRYPTION_XKEY_SEED": new.seed}
    rotate = run_cli("rotate-key", "--nats-address", url, env=rotate_env, timeout=120)
    assert rotate.returncode == 0, rotate.stderr
    rotated = Keys(transit=keys.transit, encryption=new)
    verify = run_cli("verify", "--nats-address", url, env=cli_env(rotated))
    assert verify.returncode == 0, verify.stderr
    async with running_backend(url, rotated) as clients:
        assert (await clients.get(identity, "s", version="1")).string_secret == first
        assert (await clients.get(identity, "s")).string_secret == second
        assert await clients.admin.put_secret("s", "third value") == 3
        assert clients.backend.view is not None
        assert clients.backend.view.foreign == 0
