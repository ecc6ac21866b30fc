"""The audit export and the access log, against a real backend and server.

The export of a scripted history is compared with that history field by field: the test
records what it did (which admin key, under which request id, at which revision) while
doing it, so the export is checked against an independent account, not against the log
it was made from. It must hold no value in any form. The access log is checked the same
way against the gets the test made, and must never stand between a host and its secret.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from actors.access_log import AccessLog
from events.access import (
    AccessRecord,
    UndecodableAccessRecord,
    access_stream_name,
    access_subject,
    decode_access,
    encode_access,
)
from events.types import Rejected
from projections.audit import Bound, export_audit
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.errors import ConfigError, SecretNotFound, Unauthorized
from secrets_nats_kv.nats.reader import stream_messages
from secrets_nats_kv.xkeys import XKey
from support.harness import (
    CLI,
    REPO,
    Clients,
    Identity,
    Keys,
    cli_env,
    fresh_names,
    run_cli,
    running_backend,
)
from support.store import encodings, log_entries, message_bytes, messages_in, sealed_at

pytestmark = pytest.mark.anyio

ACCESS = access_stream_name("nats-kv")
DEADLINE_S = 10.0
BINARY = b"\x00\xffbinary-beta\x01"


class RecordingAdmin(AdminClient):
    """An admin client that remembers the request id of each operation it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_ids: list[str] = []

    def _stamp(self) -> tuple[str, int]:  # type: ignore[override]  # instance, not static
        request_id, issued_at = AdminClient._stamp()
        self.request_ids.append(request_id)
        return request_id, issued_at


@dataclass
class Script:
    """The test's own account of what it did, as the audit export must tell it."""

    expected: list[dict[str, Any]] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    sealed: list[bytes] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def did(self, admin: RecordingAdmin, type_: str, **fields: Any) -> None:
        self.expected.append(
            {
                "seq": len(self.expected) + 1,
                "type": type_,
                **fields,
                "admin_key": admin.admin_key.public_key,
                "authenticated": True,
                "request_id": admin.request_ids[-1],
            }
        )

    def erased(self, seq: int) -> None:
        """A destroy erased the put at `seq`: what is left of it is its revision."""
        revision = self.expected[seq - 1]["revision"]
        self.expected[seq - 1] = {"seq": seq, "type": "erased", "revision": revision}


@dataclass
class Admins:
    one: RecordingAdmin
    two: RecordingAdmin


@pytest.fixture
async def audited(nats_server: NatsServer) -> AsyncIterator[tuple[Clients, Admins]]:
    """A backend with two admin keys, each with a recording client."""
    second = XKey.generate()
    async with running_backend(nats_server.url, admin_xkeys=(second.public_key,)) as clients:
        nc, names = clients.admin.nc, clients.names
        yield (
            clients,
            Admins(
                RecordingAdmin(nc, names, clients.keys.transit), RecordingAdmin(nc, names, second)
            ),
        )


async def scripted_history(clients: Clients, admins: Admins) -> Script:
    script = Script(started=time.time())
    one, two = admins.one, admins.two
    entity = Identity().entity_key
    nc = clients.admin.nc

    async def put(admin: RecordingAdmin, name: str, value: str | bytes, kind: str) -> int:
        revision = await admin.put_secret(name, value)
        script.did(admin, "secret_put", secret=name, revision=revision, kind=kind)
        script.values.append(value.encode() if isinstance(value, str) else value)
        script.sealed.append(await sealed_at(nc, revision))
        return revision

    assert await put(one, "alpha", "alpha-value-1", "string") == 1  # seq 1
    assert await put(two, "alpha", "alpha-value-2", "string") == 2  # seq 2
    assert await put(one, "beta", BINARY, "binary") == 3  # seq 3
    await two.add_mapping(entity, ["beta", "alpha"])  # seq 4
    script.did(two, "mapping_added", entity=entity, secrets=["beta", "alpha"])
    await one.remove_mapping(entity, ["beta"])  # seq 5
    script.did(one, "mapping_removed", entity=entity, secrets=["beta"])
    assert await two.delete("alpha") == 4  # seq 6
    script.did(two, "secret_deleted", secret="alpha", revision=4)
    assert await one.undelete("alpha") == 5  # seq 7
    script.did(one, "secret_undeleted", secret="alpha", revision=5)
    assert await two.destroy("alpha", version=1) == [1]  # seq 8
    script.did(two, "secret_destroyed", secret="alpha", versions=[1])
    script.erased(1)
    assert await put(one, "gamma", "gamma-value", "string") == 6  # seq 9
    assert await one.destroy("gamma", all=True) == [6]  # seq 10
    script.did(one, "secret_destroyed", secret="gamma", versions=[6])
    script.erased(9)
    script.finished = time.time()
    return script


async def export(nc: NATS, keys: Keys, **options: Any) -> list[dict[str, Any]]:
    out = io.BytesIO()
    settings: dict[str, Any] = {"since": None, "until": None, "follow": False}
    settings["include_access"] = options.pop("access", False)
    settings.update(options)
    count = await export_audit(nc, "nats-kv", out, encryption=keys.encryption, **settings)
    lines = out.getvalue().splitlines()
    assert count == len(lines)
    return [json.loads(line) for line in lines]


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in record.items() if k != "time"} for record in records]


def parse_time(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def assert_holds_no_value(output: bytes, script: Script) -> None:
    for value in script.values:
        assert value not in output
    for sealed in script.sealed:
        for form in encodings(sealed):
            assert form not in output


async def cli(server: NatsServer, keys: Keys, *args: str) -> bytes:
    """The CLI in a thread, so the in-process backend keeps serving meanwhile."""
    env = cli_env(keys)
    done = await anyio.to_thread.run_sync(
        lambda: run_cli(*args, "--nats-address", server.url, env=env)
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- the event history --------------------------------------------------------------------


async def test_the_export_is_the_history_exactly_and_holds_no_value(
    audited: tuple[Clients, Admins], nats_server: NatsServer
) -> None:
    clients, admins = audited
    script = await scripted_history(clients, admins)
    records = await export(clients.admin.nc, clients.keys)

    assert without_time(records) == script.expected
    times = [parse_time(record["time"]) for record in records]
    assert all(script.started - 0.001 <= t <= script.finished + 1 for t in times)
    kept = [t for t, r in zip(times, records, strict=True) if r["type"] != "erased"]
    assert kept == sorted(kept)

    output = await cli(nats_server, clients.keys, "audit", "export")
    assert [json.loads(line) for line in output.splitlines()] == records
    assert_holds_no_value(output, script)


async def test_since_and_until_by_sequence(audited: tuple[Clients, Admins]) -> None:
    clients, admins = audited
    script = await scripted_history(clients, admins)
    nc, keys = clients.admin.nc, clients.keys

    def seqs(records: list[dict[str, Any]]) -> list[int]:
        return [record["seq"] for record in records]

    everything = await export(nc, keys)
    assert without_time(everything) == script.expected
    assert seqs(await export(nc, keys, since=Bound.parse("4"))) == [4, 5, 6, 7, 8, 9, 10]
    assert seqs(await export(nc, keys, until=Bound.parse("3"))) == [1, 2, 3]
    window = await export(nc, keys, since=Bound.parse("5"), until=Bound.parse("8"))
    assert window == everything[4:8]  # the same records, revisions included
    assert await export(nc, keys, since=Bound.parse("11")) == []
    with pytest.raises(ConfigError):
        Bound.parse("yesterday")


def iso_microseconds(moment: int) -> str:
    stamp = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (stamp + datetime.timedelta(microseconds=moment)).isoformat().replace("+00:00", "Z")


async def test_since_and_until_by_iso_time(
    audited: tuple[Clients, Admins], nats_server: NatsServer
) -> None:
    clients, admins = audited
    await scripted_history(clients, admins)
    nc, keys = clients.admin.nc, clients.keys
    at = {
        entry.seq: entry.event.at
        for entry in await log_entries(nc, keys)
        if entry.event is not None and not isinstance(entry.event, Rejected)
    }
    assert sorted(at) == [2, 3, 4, 5, 6, 7, 8, 10]  # 1 and 9 were erased
    # Bounds strictly between events 3 and 4, and between events 7 and 8.
    since = iso_microseconds(math.floor(at[4] * 1e6) - 1)
    until = iso_microseconds(math.ceil(at[7] * 1e6) + 1)
    since_bound, until_bound = Bound.parse(since), Bound.parse(until)
    assert since_bound is not None
    assert since_bound.at is not None
    assert until_bound is not None
    assert until_bound.at is not None
    assert at[3] < since_bound.at <= at[4]
    assert at[7] <= until_bound.at < at[8]

    everything = await export(nc, keys)
    window = await export(nc, keys, since=since_bound, until=until_bound)
    assert window == everything[3:7]
    assert [r["seq"] for r in await export(nc, keys, since=since_bound)] == [4, 5, 6, 7, 8, 9, 10]

    output = await cli(nats_server, keys, "audit", "export", "--since", since, "--until", until)
    assert [json.loads(line) for line in output.splitlines()] == window
    env = cli_env(keys)
    refused = await anyio.to_thread.run_sync(
        lambda: run_cli(
            "audit", "export", "--since", "last tuesday", "--nats-address", nats_server.url, env=env
        )
    )
    assert refused.returncode != 0
    assert refused.stdout == b""
    assert len(refused.stderr.splitlines()) == 1


async def test_follow_streams_new_events_as_they_are_appended(
    audited: tuple[Clients, Admins], nats_server: NatsServer
) -> None:
    clients, admins = audited
    await admins.one.put_secret("first", "first-value")
    env = cli_env(clients.keys)
    command = [*CLI, "audit", "export", "--follow", "--nats-address", nats_server.url]
    async with await anyio.open_process(command, env=env, cwd=REPO) as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        try:
            with anyio.fail_after(DEADLINE_S):
                first = json.loads(await lines.receive_until(b"\n", 1 << 16))
                assert (first["seq"], first["type"], first["secret"]) == (1, "secret_put", "first")
                # Appended while the export runs: its line arrives without a restart.
                revision = await admins.two.put_secret("second", "second-value")
                second = json.loads(await lines.receive_until(b"\n", 1 << 16))
                await admins.one.delete("first")
                third = json.loads(await lines.receive_until(b"\n", 1 << 16))
        finally:
            process.terminate()
            await process.wait()
    assert second["seq"] == 2
    assert second["type"] == "secret_put"
    assert (second["secret"], second["revision"]) == ("second", revision)
    assert second["admin_key"] == admins.two.admin_key.public_key
    assert second["request_id"] == admins.two.request_ids[-1]
    assert (third["seq"], third["type"], third["secret"]) == (3, "secret_deleted", "first")


async def test_follow_with_access_streams_events_and_gets_as_they_happen(
    audited: tuple[Clients, Admins], nats_server: NatsServer
) -> None:
    """`--follow --access` interleaves both streams live: a put, then the gets it allows."""
    clients, admins = audited
    reader, stranger = Identity(), Identity()
    env = cli_env(clients.keys)
    command = [*CLI, "audit", "export", "--follow", "--access", "--nats-address", nats_server.url]
    async with await anyio.open_process(command, env=env, cwd=REPO) as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)

        async def next_record() -> dict[str, Any]:
            record: dict[str, Any] = json.loads(await lines.receive_until(b"\n", 1 << 16))
            return record

        try:
            with anyio.fail_after(DEADLINE_S):
                await admins.one.put_secret("alpha", "alpha-follow-value")
                put = await next_record()
                await admins.one.add_mapping(reader.entity_key, ["alpha"])
                mapped = await next_record()
                assert (await clients.get(reader, "alpha")).string_secret == "alpha-follow-value"
                granted = await next_record()
                with pytest.raises(Unauthorized):
                    await clients.get(stranger, "alpha")
                refused = await next_record()
        finally:
            process.terminate()
            await process.wait()
    assert (put["type"], put["secret"]) == ("secret_put", "alpha")
    assert (mapped["type"], mapped["entity"]) == ("mapping_added", reader.entity_key)
    assert granted["type"] == refused["type"] == "get"
    assert (granted["entity"], granted["granted"]) == (reader.entity_key, True)
    assert (refused["entity"], refused["granted"]) == (stranger.entity_key, False)
    assert refused["error"] == '"Unauthorized"'
    assert "alpha-follow-value" not in json.dumps([put, mapped, granted, refused])


# --- the access log -----------------------------------------------------------------------


async def stored_access_batches(
    nc: NATS, backend_name: str, records: int
) -> list[tuple[AccessRecord, ...]]:
    """The access stream's messages, decoded, followed as they are stored until they hold
    `records` records (they are published after the reply, so this waits for them)."""
    batches: list[tuple[AccessRecord, ...]] = []
    stored = stream_messages(
        nc, access_stream_name(backend_name), access_subject(backend_name), follow=True
    )
    with anyio.fail_after(DEADLINE_S):
        async with contextlib.aclosing(stored):
            async for message in stored:
                batches.append(decode_access(message.data))
                if sum(map(len, batches)) >= records:
                    break
    return batches


async def wait_for_access_records(nc: NATS, count: int) -> None:
    await stored_access_batches(nc, "nats-kv", count)


async def test_access_export_includes_every_get_decision(
    audited: tuple[Clients, Admins],
) -> None:
    clients, admins = audited
    nc = clients.admin.nc
    reader, stranger = Identity(), Identity.provider()
    await admins.one.put_secret("alpha", "alpha-value-1")
    await admins.one.put_secret("alpha", "alpha-value-2")
    await admins.one.put_secret("beta", "beta-value")
    await admins.one.add_mapping(reader.entity_key, ["alpha"])
    sealed = [await sealed_at(nc, revision) for revision in (1, 2, 3)]

    assert (await clients.get(reader, "alpha")).string_secret == "alpha-value-2"
    assert (await clients.get(reader, "alpha", version="1")).string_secret == "alpha-value-1"
    with pytest.raises(Unauthorized):
        await clients.get(reader, "beta")
    with pytest.raises(SecretNotFound):
        await clients.get(reader, "alpha", version="9")
    with pytest.raises(Unauthorized):
        await clients.get(stranger, "alpha")
    await wait_for_access_records(nc, 5)

    records = await export(nc, clients.keys, access=True)
    gets = [record for record in records if record["type"] == "get"]
    history = [record["type"] for record in records if record["type"] != "get"]
    assert history == ["secret_put", "secret_put", "secret_put", "mapping_added"]
    expected = [
        ("alpha", None, reader, True, None),
        ("alpha", "1", reader, True, None),
        ("beta", None, reader, False, '"Unauthorized"'),
        ("alpha", "9", reader, False, '"SecretNotFound"'),
        ("alpha", None, stranger, False, '"Unauthorized"'),
    ]
    assert [{k: v for k, v in record.items() if k != "time"} for record in gets] == [
        {
            "type": "get",
            "secret": secret,
            "granted": granted,
            **({"version": version} if version is not None else {}),
            "entity": who.entity_key,
            "host": who.host.public_key,
            **({"error": error} if error is not None else {}),
        }
        for secret, version, who, granted, error in expected
    ]
    times = [parse_time(record["time"]) for record in records]
    assert times == sorted(times)  # events and gets merged in time order

    output = b"".join(json.dumps(record).encode() for record in records)
    output += b"".join(message_bytes(m) for m in await messages_in(nc, ACCESS))  # as stored
    for value in (b"alpha-value-1", b"alpha-value-2", b"beta-value"):
        assert value not in output
    for data in sealed:
        assert all(form not in output for form in encodings(data))
    # Without --access, the same export has no get in it.
    assert all(r["type"] != "get" for r in await export(nc, clients.keys))


async def test_no_access_log_records_nothing(nats_server: NatsServer) -> None:
    async with running_backend(nats_server.url, access_log=False) as clients:
        reader = Identity()
        await clients.admin.put_secret("alpha", "alpha-value")
        await clients.admin.add_mapping(reader.entity_key, ["alpha"])
        assert (await clients.get(reader, "alpha")).string_secret == "alpha-value"
        with pytest.raises(Unauthorized):
            await clients.get(Identity(), "alpha")
        nc = clients.admin.nc
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream(timeout=5).stream_info(ACCESS)
        records = await export(nc, clients.keys, access=True)
    assert [record["type"] for record in records] == ["secret_put", "mapping_added"]


async def test_gets_are_served_when_the_access_log_cannot_be_written(
    audited: tuple[Clients, Admins],
) -> None:
    clients, admins = audited
    nc = clients.admin.nc
    reader = Identity()
    await admins.one.put_secret("alpha", "alpha-value")
    await admins.one.add_mapping(reader.entity_key, ["alpha"])
    assert (await clients.get(reader, "alpha")).string_secret == "alpha-value"
    await wait_for_access_records(nc, 1)

    await nc.jetstream(timeout=5).delete_stream(ACCESS)  # nowhere left to record gets

    with anyio.fail_after(DEADLINE_S):
        for n in range(50):
            version = None if n % 2 else "1"
            secret = await clients.get(reader, "alpha", version=version)
            assert (secret.version, secret.string_secret) == ("1", "alpha-value")
        with pytest.raises(Unauthorized):
            await clients.get(Identity(), "alpha")
    # Writes are unaffected too, and the export still works without an access stream.
    assert await admins.two.put_secret("alpha", "alpha-value-2") == 2
    assert (await clients.get(reader, "alpha")).string_secret == "alpha-value-2"
    records = await export(nc, clients.keys, access=True)
    assert [record["type"] for record in records] == ["secret_put", "mapping_added", "secret_put"]


# --- access records are stored in batches -------------------------------------------------

access_records_strategy = st.lists(
    st.builds(
        AccessRecord,
        at=st.floats(min_value=0, max_value=4e9),
        secret=st.text(max_size=30),
        version=st.none() | st.text(max_size=5),
        entity=st.none() | st.text(max_size=56),
        host=st.none() | st.text(max_size=56),
        granted=st.booleans(),
        error=st.none() | st.sampled_from(['"Unauthorized"', '{"Other":"x"}']),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=100, deadline=None)
@given(records=access_records_strategy)
def test_an_access_batch_decodes_to_its_records_and_a_lone_record_to_one(
    records: list[AccessRecord],
) -> None:
    assert decode_access(encode_access(records)) == tuple(records)
    assert decode_access(msgspec.json.encode(records[0])) == (records[0],)  # the lone form


@pytest.mark.parametrize("data", [b"", b"[]", b'{"type":"gets"}', b'{"type":"put"}', b"\xff"])
def test_what_is_not_an_access_message_is_refused_with_one_error(data: bytes) -> None:
    with pytest.raises(UndecodableAccessRecord):
        decode_access(data)


def decision(n: int, secret: str = "s") -> AccessRecord:
    return AccessRecord(
        at=time.time(),
        secret=f"{secret}{n}",
        version=None,
        entity="M" * 56,
        host="N" * 56,
        granted=True,
        error=None,
    )


async def stored_batches(
    nats_server: NatsServer, decisions: list[AccessRecord]
) -> tuple[list[tuple[AccessRecord, ...]], AccessLog]:
    """Hand `decisions` to a running access log in one go; the messages it stored for them."""
    names = fresh_names()
    nc = await nats.connect(nats_server.url)
    try:
        access_log = AccessLog(nc, backend_name=names.name)
        await access_log.ensure()
        async with anyio.create_task_group() as tg:
            await tg.start(access_log.run)
            for item in decisions:  # no await in between: all buffered before a publish
                access_log.record(item)
            batches = await stored_access_batches(nc, names.name, len(decisions))
            tg.cancel_scope.cancel()
        return batches, access_log
    finally:
        await nc.close()


async def test_decisions_made_together_are_stored_as_one_message(
    nats_server: NatsServer,
) -> None:
    decisions = [decision(n) for n in range(300)]
    batches, access_log = await stored_batches(nats_server, decisions)
    assert len(batches) == 1
    assert [record.secret for record in batches[0]] == [d.secret for d in decisions]
    assert (access_log.recorded, access_log.dropped) == (300, 0)


async def test_a_batch_over_the_payload_limit_is_split_and_nothing_is_dropped(
    nats_server: NatsServer,
) -> None:
    decisions = [decision(n, secret="x" * 2_000) for n in range(800)]  # ~2 MB of records
    batches, access_log = await stored_batches(nats_server, decisions)
    assert len(batches) > 1
    assert [r.secret for batch in batches for r in batch] == [d.secret for d in decisions]
    assert (access_log.recorded, access_log.dropped) == (800, 0)
