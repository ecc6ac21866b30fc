"""Bounded costs on a real server: what hostile or oversized input may cost the backend.

Junk on the event log's subjects is one incident with a count (never a log line per
entry); the access stream has retention limits and cut-down fields; the event stream
has a maximum message size; the largest secret is one stated number, refused in one
line by the CLI and the backend alike, and it follows the server's `max_payload`;
deeply nested JSON anywhere is the protocol's error for that field; a bucket deleted
under a running backend is recreated, and a write is never reported failed yet stored;
a deleted event log is a write-blocking incident, never silently recreated;
a forged `STREAM.INFO` answer from a stranger delays a get by at most the freshness
timeout and never makes it serve stale data.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from actors.backend import BUCKET_RECREATED, FORGED_API_ANSWERS, REJECTED_ENTRIES
from events.access import AccessRecord, access_stream_name, access_subject, decode_access
from events.log import (
    EventLog,
    stream_messages,
    stream_name,
    stream_subjects,
    subject_prefix,
)
from events.types import SecretPut
from projections.foreign import UnexplainedEntries
from projections.live import LOG_DELETED
from secrets_nats_kv import limits, wire
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import SecretTooLarge, Unauthorized, UpstreamError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import STREAM_NOT_FOUND, stream_state
from secrets_nats_kv.nkeys import SigningKey
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.wire import HOST_XKEY_HEADER, RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import SealBox, XKey
from support.harness import (
    REPO,
    Clients,
    Identity,
    cli_env,
    fresh_names,
    run_cli,
    running_backend,
)
from support.leakcheck import exempt

if TYPE_CHECKING:
    from conftest import MakeNatsServer

    from secrets_nats_kv.app.natsserver import NatsServer

pytestmark = pytest.mark.anyio


async def test_junk_on_the_log_is_one_incident_with_a_count(
    module_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """500 untagged messages on a subject the log keeps: counted, logged once, gets go on."""
    names = fresh_names()
    identity = Identity()
    caplog.set_level(logging.INFO)
    async with running_backend(module_nats_server.url, names=names) as clients:
        assert await clients.put_readable(identity, "s", "v") == 1
        nc = clients.host.nc
        for i in range(500):
            await nc.publish(f"{subject_prefix(names.name)}.secret.s", b"junk %d" % i)
        await nc.flush()
        view = clients.backend.view
        assert view is not None
        with anyio.fail_after(30):
            while view.foreign < 500:  # the follower has folded every junk entry
                await view.wait_applied(view.applied_seq + 1)
        incident = clients.backend.health.incidents[REJECTED_ENTRIES]
        assert incident.count == 500
        assert (await clients.get(identity, "s")).string_secret == "v"
        assert await clients.admin.put_secret("s", "v2") == 2  # revisions unaffected by junk
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert errors[0] == (
        f"incident {REJECTED_ENTRIES}: entries not tagged by our key skipped (latest #3)"
    ), errors


async def test_junk_on_other_subjects_under_the_prefix_never_reaches_the_log(
    module_nats_server: NatsServer,
) -> None:
    """The stream keeps only the subjects something of ours writes (events.log): an older
    stream that kept the whole prefix is narrowed at start, and a flood elsewhere under
    the prefix is not stored, moves no head and reaches no consumer."""
    names = fresh_names()
    prefix = subject_prefix(names.name)
    older = api.StreamConfig(name=stream_name(names.name), subjects=[f"{prefix}.>"])
    setup = await connect(
        NatsOptions(servers=(module_nats_server.url,)), name="setup", persistent=False
    )
    try:
        await setup.jetstream().add_stream(older)
    finally:
        await setup.close()
    async with running_backend(module_nats_server.url, names=names) as clients:
        js = clients.host.nc.jetstream()
        info = await js.stream_info(stream_name(names.name))
        assert info.config.subjects == stream_subjects(names.name)
        assert await clients.admin.put_secret("s", "v") == 1
        nc = clients.host.nc
        for i in range(500):
            await nc.publish(f"{prefix}.junk", b"junk %d" % i)
            await nc.publish(f"{prefix}.secret", b"junk %d" % i)  # `secret.>` needs a name
        with pytest.raises(nats.js.errors.NoStreamResponseError):  # no stream keeps it
            await js.publish(f"{prefix}.junk", b"junk")
        assert (await stream_state(nc, stream_name(names.name), 5)).last_seq == 1
        assert clients.backend.view is not None
        assert clients.backend.view.foreign == 0
        assert REJECTED_ENTRIES not in clients.backend.health.incidents
        assert await clients.admin.put_secret("s", "v2") == 2


# --- bounded streams --------------------------------------------------------------------------


async def test_the_access_stream_has_retention_limits_and_short_fields(
    module_nats_server: NatsServer,
) -> None:
    names = fresh_names()
    identity = Identity()
    async with running_backend(module_nats_server.url, names=names) as clients:
        js = clients.host.nc.jetstream()
        info = await js.stream_info(access_stream_name(names.name))
        assert info.config.max_bytes == limits.ACCESS_LOG_MAX_BYTES == 256 * 1024 * 1024
        assert info.config.max_age == 90 * 24 * 3600
        assert info.config.discard == api.DiscardPolicy.OLD
        huge = "k" * 100_000
        recorded = await clients.host.nc.subscribe(access_subject(names.name))
        with pytest.raises(Unauthorized):
            await clients.get(identity, huge, version="v" * 50_000)
        await recorded.next_msg(timeout=10)  # the access log publishes in the background
        await stream_state(clients.host.nc, access_stream_name(names.name), 5.0)
        info = await js.stream_info(access_stream_name(names.name))
        assert info.state.bytes < 4096  # not the 150 KB the request carried
        (record,) = await access_records(clients.host.nc, names)
        assert record.secret == "k" * 255 + "…"
        assert record.version is not None
        assert len(record.version) == limits.ACCESS_FIELD_MAX
    # A restart with other limits brings the existing stream to them.
    async with running_backend(
        module_nats_server.url,
        names=names,
        access_log_max_bytes=8 * 1024 * 1024,
        access_log_max_age_days=7,
    ) as clients:
        info = await clients.host.nc.jetstream().stream_info(access_stream_name(names.name))
        assert (info.config.max_bytes, info.config.max_age) == (8 * 1024 * 1024, 7 * 24 * 3600)


async def access_records(nc: NATS, names: BackendNames) -> list[AccessRecord]:
    stream = access_stream_name(names.name)
    found: list[AccessRecord] = []
    async for message in stream_messages(nc, stream, access_subject(names.name)):
        found += decode_access(message.data)
    return found


async def test_the_event_stream_refuses_messages_over_its_size(
    module_nats_server: NatsServer,
) -> None:
    names = fresh_names()
    async with running_backend(module_nats_server.url, names=names) as clients:
        nc = clients.host.nc
        js = nc.jetstream()
        info = await js.stream_info(stream_name(names.name))
        assert info.config.max_msg_size == limits.max_event_size(nc.max_payload)
        before = info.state.last_seq
        with pytest.raises(nats.js.errors.APIError):
            await js.publish(f"{subject_prefix(names.name)}.secret.big", b"j" * 400_000)
        assert (await js.stream_info(stream_name(names.name))).state.last_seq == before
        # The largest secret's event fits.
        value = b"\xff" * limits.max_secret_size(nc.max_payload)
        assert await clients.admin.put_secret("big", value) == 1


# --- the value size limit ---------------------------------------------------------------------


LIMIT = limits.max_secret_size()  # with the server's default max_payload of 1 MiB


def test_the_limit_is_the_readme_number() -> None:
    assert LIMIT == 258_048
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "258 048 bytes" in readme


async def test_the_largest_secret_works_end_to_end_and_one_byte_more_is_refused(
    module_nats_server: NatsServer, tmp_path: Path
) -> None:
    names = fresh_names()
    identity = Identity()
    url = module_nats_server.url
    flags = ("--nats-address", url, "--name", names.name)  # the bucket is the backend's
    async with running_backend(url, names=names) as clients:
        env = cli_env(clients.keys)
        largest = tmp_path / "largest.bin"
        largest.write_bytes(bytes(range(256)) * (LIMIT // 256))
        exempt(largest)  # the operator's own input file: the one place the plaintext belongs
        assert largest.stat().st_size == LIMIT
        put = await cli(env, "put", "bin", "--binary", str(largest), *flags)
        assert put.returncode == 0, put.stderr
        text = "t" * LIMIT  # (over the OS's 128 KiB for one argument: the CLI's client)
        assert await clients.admin.put_secret("text", text) == 2
        await clients.admin.add_mapping(identity.entity_key, ["bin", "text"])
        got = await clients.get(identity, "bin")
        assert got.binary_secret is not None
        assert bytes(got.binary_secret) == largest.read_bytes()
        assert (await clients.get(identity, "text")).string_secret == text
        before = await head(clients)
        over = tmp_path / "over.bin"
        over.write_bytes(b"\0" * (LIMIT + 1))
        refused = await cli(env, "put", "bin", "--binary", str(over), *flags)
        assert refused.returncode == 1
        lines = refused.stderr.decode().splitlines()
        assert lines == [
            f"secrets-nats-kv: error: the secret is {LIMIT + 1} bytes; the largest secret is "
            f"{LIMIT} bytes (a quarter of the server's max_payload of 1048576 bytes, less 4 KiB)"
        ]
        for value in ("t" * (LIMIT + 1), "\x01" * (LIMIT * 3 // 4)):  # the second: 6x escaped
            with pytest.raises(SecretTooLarge, match=f"the largest secret is {LIMIT} bytes"):
                await clients.admin.put_secret("text", value)
        # The backend refuses too, whoever sends it (here a client that does not check).
        with pytest.raises(SecretTooLarge):
            await unchecked_put(clients, "text", "t" * (LIMIT + 1))
        assert await head(clients) == before  # nothing was stored


async def head(clients: Clients) -> int:
    stream = stream_name(clients.names.name)
    return (await stream_state(clients.host.nc, stream, 5.0)).last_seq


async def unchecked_put(clients: Clients, name: str, value: str) -> int:
    """put_secret as a client that skips the size check (sealed like the real one)."""
    admin = clients.admin
    request = wire.AdminPutSecretRequest(
        key=name,
        string_secret=value,
        request_id=uuid.uuid4().hex,
        issued_at=int(time.time()),
        operation="put_secret",  # bound to its subject, as every admin body is
    )
    data = await admin._sealed_request("put_secret", wire.encode_put_request(request))
    return wire.decode_put_response(data).result()


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.to_thread.run_sync(lambda: run_cli(*args, env=env, timeout=60))


async def test_the_limit_follows_a_raised_max_payload(make_nats_server: MakeNatsServer) -> None:
    server = make_nats_server(extra_conf="max_payload: 4194304")
    identity = Identity()
    async with running_backend(server.url) as clients:
        nc = clients.host.nc
        assert nc.max_payload == 4 * 1024 * 1024
        raised = limits.max_secret_size(nc.max_payload)
        assert raised == 4 * LIMIT + 3 * limits.ENVELOPE
        value = "r" * raised
        assert await clients.put_readable(identity, "s", value) == 1
        assert (await clients.get(identity, "s")).string_secret == value
        with pytest.raises(SecretTooLarge):
            await unchecked_put(clients, "s", value + "r")


# --- deep or hostile JSON ---------------------------------------------------------------------


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def token_with(claims_json: str, signer: SigningKey) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(b'{"typ":"jwt","alg":"Ed25519"}')
    body = b64(claims_json.encode())
    return f"{header}.{body}.{b64(signer.sign(f'{header}.{body}'.encode()))}"


async def test_deep_json_anywhere_is_the_protocols_error_for_that_field(
    module_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    identity = Identity()
    account = identity.account
    entity, host = identity.entity.public_key, identity.host.public_key
    deep_entity = token_with(
        f'{{"jti":"j","iat":1,"iss":"{account.public_key}","sub":"{entity}",'
        f'"wascap":{{"name":{deep(5000)}}}}}',
        account,
    )
    deep_host = token_with(
        f'{{"jti":"j","iat":1,"iss":"{account.public_key}","sub":"{host}","x":{deep(5000)}}}',
        account,
    )
    async with running_backend(module_nats_server.url, names=fresh_names()) as clients:
        await clients.put_readable(identity, "s", "v")
        transit = XKey.from_public(await clients.host.server_xkey())

        async def raw_get(body: bytes) -> object:
            sender = XKey.generate()
            data, headers = await clients.host.request(
                "get", sender.seal(body, transit), {HOST_XKEY_HEADER: sender.public_key}
            )
            if RESPONSE_XKEY_HEADER in headers:  # served, sealed to the sender
                return None
            return msgspec.json.decode(data)["error"]

        def get_body(**context: object) -> bytes:
            fields: dict[str, object] = {
                "entity_jwt": identity.entity_jwt(),
                "host_jwt": identity.host_jwt(),
                "application": {"name": None, "policy": ""},
                **context,
            }
            return msgspec.json.encode({"key": "s", "context": fields})

        error = await raw_get(get_body(entity_jwt=deep_entity))
        assert error == {"InvalidEntityJWT": "malformed claims: nested too deeply"}
        error = await raw_get(get_body(host_jwt=deep_host))
        assert error == {"InvalidHostJWT": "malformed claims: nested too deeply"}
        assert await raw_get(f'{{"key":"s","context":{deep(100_000)}}}'.encode()) == (
            "InvalidRequest"
        )
        assert await raw_get(deep(100_000).encode()) == "InvalidRequest"
        # Policy text is carried, never parsed: a deep one changes nothing.
        policy = {"name": "app", "policy": deep(100_000)}
        assert await raw_get(get_body(application=policy)) is None
        # Admin requests, sealed by the admin key, with deep bodies.
        admin = clients.admin
        for operation in ("put_secret", f"add_mapping.{entity}", "delete", "list"):
            data = await admin._sealed_request(operation, deep(100_000).encode())
            assert b"Other" not in data, (operation, data)
            assert b"internal" not in data, (operation, data)
        data = await admin._sealed_request(
            "put_secret", f'{{"key":"s","string_secret":"v","x":{deep(100_000)}}}'.encode()
        )
        assert msgspec.json.decode(data) == {"revision": 0, "error": "InvalidRequest"}
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --- vanished buckets -------------------------------------------------------------------------


async def test_a_bucket_deleted_under_a_running_backend_is_recreated_and_refilled(
    module_nats_server: NatsServer,
) -> None:
    """The next write is acknowledged (not UpstreamError-but-stored) and the views refilled."""
    names = fresh_names()
    identity, other = Identity(), Identity()
    async with running_backend(module_nats_server.url, names=names) as clients:
        assert await clients.put_readable(identity, "s", "v1") == 1
        js = clients.host.nc.jetstream()
        for bucket in (names.secrets_bucket, names.state_bucket):
            assert await js.delete_stream(kv_stream(bucket))
        assert await clients.put_readable(other, "s", "v2") == 2
        box = SealBox(clients.keys.encryption, clients.keys.encryption)
        entry = await js.get_last_msg(
            kv_stream(names.secrets_bucket), f"$KV.{names.secrets_bucket}.s"
        )
        assert (entry.seq, box.open(entry.data)) == (2, b"v2")
        first = await js.get_msg(kv_stream(names.secrets_bucket), 1)
        assert box.open(first.data) == b"v1"  # the history came back too
        mapping = await js.get_last_msg(
            kv_stream(names.state_bucket), f"$KV.{names.state_bucket}.{other.entity_key}"
        )
        assert msgspec.json.decode(mapping.data) == ["s"]
        assert BUCKET_RECREATED in clients.backend.health.incidents
        assert (await clients.get(other, "s")).string_secret == "v2"


async def test_an_event_log_deleted_under_a_running_backend_is_an_incident_not_a_new_log(
    module_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One ERROR line and a write-blocking incident; gets and writes fail naming it; the
    log is not recreated (an empty one would be taken as the truth), and a restart is
    refused as the anchor refuses an emptied log."""
    names = fresh_names()
    identity = Identity()
    caplog.set_level(logging.INFO)
    async with running_backend(module_nats_server.url, names=names) as clients:
        keys = clients.keys
        assert await clients.put_readable(identity, "s", "v1") == 1
        assert (await clients.get(identity, "s")).string_secret == "v1"
        js = clients.host.nc.jetstream()
        assert await js.delete_stream(stream_name(names.name))
        with pytest.raises(UpstreamError, match="was deleted under this backend"):
            await clients.get(identity, "s")
        with pytest.raises(UpstreamError):
            await clients.admin.put_secret("s", "v2")
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(stream_name(names.name))  # not recreated
        incidents = clients.backend.health.snapshot()
        assert [i["kind"] for i in incidents if i["blocks_writes"]] == [LOG_DELETED]
        env = cli_env(None, NATS_ADDRESS=module_nats_server.url.removeprefix("nats://"))
        status = await anyio.to_thread.run_sync(
            lambda: run_cli("status", "-n", names.name, "--timeout", "2", env=env)
        )
        assert status.returncode == 1
        assert f"incident {LOG_DELETED}: " in status.stdout.decode()
        assert "was deleted under this backend" in status.stdout.decode()
        assert "does not exist (deleted?)" in status.stderr.decode()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([e for e in errors if LOG_DELETED in e]) == 1, errors
    with pytest.raises(BaseExceptionGroup) as refused:
        async with running_backend(module_nats_server.url, keys, names=names):
            pytest.fail("a backend started over a deleted event log")
    assert refused.group_contains(UnexplainedEntries, match="the log was deleted or replaced")


# --- JetStream API answers from strangers (an open bus) ---------------------------------------


@contextlib.asynccontextmanager
async def forging_stream_info(
    url: str, stream: str, last_seq: int | None
) -> AsyncIterator[list[int]]:
    """A second connection answering every STREAM.INFO of `stream` with a made-up head
    (None: with JetStream's "stream not found")."""
    answered: list[int] = []
    nc = await connect(NatsOptions(servers=(url,)), name="forger", persistent=False)

    async def answer(msg: Msg) -> None:
        if last_seq is None:
            error = {"code": 404, "err_code": STREAM_NOT_FOUND, "description": "stream not found"}
            await nc.publish(msg.reply, msgspec.json.encode({"error": error}))
            await nc.flush()
            answered.append(-1)
            return
        state = {"messages": last_seq, "first_seq": 1, "last_seq": last_seq}
        await nc.publish(msg.reply, msgspec.json.encode({"state": state}))
        await nc.flush()  # at the server before the test goes on
        answered.append(last_seq)

    try:
        await nc.subscribe(f"$JS.API.STREAM.INFO.{stream}", cb=answer)
        await nc.flush()
        yield answered
    finally:
        await nc.close()


async def test_a_forged_low_head_is_caught_and_never_hides_a_write(
    module_nats_server: NatsServer,
) -> None:
    names, identity, url = fresh_names(), Identity(), module_nats_server.url
    async with running_backend(url, names=names) as clients:
        assert await clients.put_readable(identity, "s", "v1") == 1
        log = EventLog(
            clients.host.nc, backend_name=names.name, barrier=Barrier(clients.keys.encryption)
        )
        head, link = await log.tail()  # read before the forger starts: it would fool us too
        async with forging_stream_info(url, stream_name(names.name), 0) as answered:
            assert (await clients.get(identity, "s")).string_secret == "v1"
            assert answered  # the forger answered (before or after JetStream did)
            # Its answer reached the backend before this get did: the next head read knows.
            assert (await clients.get(identity, "s")).string_secret == "v1"
            assert FORGED_API_ANSWERS in clients.backend.health.incidents
            # A write acknowledged by JetStream straight after is seen by the next get,
            # though the forger keeps claiming an empty log.
            box = SealBox(clients.keys.encryption, clients.keys.encryption)
            for value in (b"v2", b"v3", b"v4"):
                event = SecretPut(at=time.time(), name="s", sealed=box.seal(value))
                appended = await log.append(event, expected_last_seq=head, previous=link)
                head, link = appended.seq, appended.link
                got = await clients.get(identity, "s")
                assert got.string_secret == value.decode()


async def test_a_forged_high_head_delays_a_get_at_most_the_freshness_timeout(
    module_nats_server: NatsServer,
) -> None:
    names, identity, url = fresh_names(), Identity(), module_nats_server.url
    async with running_backend(url, names=names) as clients:
        assert await clients.put_readable(identity, "s", "v1") == 1
        clients.host.timeout = 30.0  # the backend answers after its freshness timeout
        async with forging_stream_info(url, stream_name(names.name), 10**9) as answered:
            outcomes = []
            for _ in range(2):  # the first may race JetStream's answer; the second cannot
                try:
                    outcomes.append((await clients.get(identity, "s")).string_secret)
                except UpstreamError as exc:  # the view never reaches the claimed head
                    outcomes.append(str(exc))
            assert answered
            behind = "UpstreamError: the backend's view is behind the event log"
            assert set(outcomes) <= {"v1", behind}, outcomes  # never another value
            # The highest head counts, so the view is behind it; but a get behind the head
            # waits only for the last entries on the subjects it reads, asked of the
            # stream's leader (projections.freshness): the claimed head costs it nothing.
            assert outcomes == ["v1", "v1"]
            assert clients.backend.view.subject_reads.narrowed >= 1
            assert FORGED_API_ANSWERS in clients.backend.health.incidents
        assert (await clients.get(identity, "s")).string_secret == "v1"


async def test_a_forged_stream_not_found_is_outvoted_by_jetstream(
    module_nats_server: NatsServer,
) -> None:
    """A stranger claiming the log is gone does not make the backend report it deleted."""
    names, identity, url = fresh_names(), Identity(), module_nats_server.url
    async with running_backend(url, names=names) as clients:
        assert await clients.put_readable(identity, "s", "v1") == 1
        async with forging_stream_info(url, stream_name(names.name), None) as answered:
            for _ in range(3):
                assert (await clients.get(identity, "s")).string_secret == "v1"
            assert answered
        assert LOG_DELETED not in clients.backend.health.incidents
        assert FORGED_API_ANSWERS in clients.backend.health.incidents
        assert await clients.admin.put_secret("s", "v2") == 2
