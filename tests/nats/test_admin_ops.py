"""Authenticated admin operations: who may write, what a refused write leaves behind.

Requests are sealed and sent by hand (raw `nc.request`) so each test controls the sender
key, the recipient, the header, `request_id` and `issued_at`. "Nothing changed" is
checked on the event log itself (the source of truth): its last sequence is the same
before and after. Forgery tests publish straight onto the event stream, as anyone allowed
on the bus could, and check the backend grants nothing from it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from events.codec import EventCodec
from events.log import EventLog
from events.types import (
    Event,
    MappingAdded,
    MappingRemoved,
    SecretPut,
    decode_event,
    encode_event,
)
from secrets_nats_kv import wire
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import Unauthorized
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.harness import Clients, Identity, bind_request, fresh_names, running_backend

HOST_XKEY = "WasmCloud-Host-Xkey"
RESPONSE_XKEY = "Server-Response-Xkey"
OK = b"ok"


@pytest.fixture(scope="module")
def server(module_nats_server: NatsServer) -> NatsServer:
    """The module's shared server (see conftest); tests isolate with `fresh_names`."""
    return module_nats_server


# --- requests by hand -----------------------------------------------------------------------


def stamp(offset: float = 0) -> dict[str, Any]:
    """A fresh `request_id` and an `issued_at` `offset` seconds from now."""
    return {"request_id": uuid.uuid4().hex, "issued_at": int(time.time() + offset)}


def put_body(key: str, value: str | bytes | None, **extra: Any) -> bytes:
    """The original's four keys (PROTOCOL.md §5), plus whatever admin fields are given."""
    string = value if isinstance(value, str) else None
    binary = list(value) if isinstance(value, bytes) else None
    body = {"key": key, "version": "", "string_secret": string, "binary_secret": binary}
    return json.dumps({**body, **extra}).encode()


def mapping_body(secrets: list[str], **extra: Any) -> bytes:
    return json.dumps({"secrets": secrets, **extra}).encode()


def put_reply(revision: int, error: str | None = None) -> bytes:
    return json.dumps({"revision": revision, "error": error}, separators=(",", ":")).encode()


def error_reply(variant: str) -> bytes:
    return b'{"error":"' + variant.encode() + b'"}'


@dataclass
class Bus:
    """A backend as seen from the bus: raw requests, the event stream, the host's view."""

    clients: Clients

    @property
    def nc(self) -> NATS:
        return self.clients.host.nc

    @property
    def names(self) -> BackendNames:
        return self.clients.names

    @property
    def transit(self) -> XKey:
        return self.clients.keys.transit

    @property
    def stream(self) -> str:
        return f"SECRETS_{self.names.name}_events"

    def event_subject(self, suffix: str) -> str:
        return f"wasmcloud_secrets_events.{self.names.name}.{suffix}"

    async def raw(
        self, operation: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> bytes:
        msg = await self.nc.request(
            self.names.subject(operation), payload, timeout=10, headers=headers
        )
        assert RESPONSE_XKEY not in (msg.headers or {})
        return msg.data

    def seal(
        self,
        body: bytes,
        sender: XKey,
        *,
        header: str | None = None,
        to: str | None = None,
        bound_to: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """`body` sealed by `sender` to the transit key (or `to`), header naming `header`;
        bound to operation `bound_to` first if given."""
        if bound_to is not None:
            body = bind_request(bound_to, body)
        sealed = sender.seal(body, to or self.transit.public_key)
        return sealed, {HOST_XKEY: header or sender.public_key}

    async def send(
        self,
        operation: str,
        body: bytes,
        sender: XKey,
        *,
        header: str | None = None,
        to: str | None = None,
        bound: bool = True,
    ) -> bytes:
        """`body` sealed and sent on `operation`; bound to it as the client binds, unless
        `bound` is False (a body for one operation sent on another)."""
        if bound:
            body = bind_request(operation, body)
        return await self.raw(operation, *self.seal(body, sender, header=header, to=to))

    async def last_seq(self) -> int:
        info = await self.nc.jetstream().stream_info(self.stream)
        return info.state.last_seq

    async def events(self) -> list[tuple[int, Event]]:
        """Every event on the log, decoded (messages that are not events fail the test)."""
        js = self.nc.jetstream()
        out = []
        for seq in range(1, await self.last_seq() + 1):
            raw = await js.get_msg(self.stream, seq)
            assert raw.data is not None
            out.append((seq, decode_event(raw.data)))
        return out

    async def raw_event(self, seq: int) -> tuple[bytes, dict[str, str]]:
        raw = await self.nc.jetstream().get_msg(self.stream, seq)
        assert raw.data is not None
        return raw.data, dict(raw.headers or {})

    async def can_get(self, identity: Identity, name: str) -> bool:
        """Whether `identity` may read `name` (False on Unauthorized, anything else fails)."""
        try:
            await self.clients.get(identity, name)
        except Unauthorized:
            return False
        return True


@pytest.fixture
async def bus(server: NatsServer) -> AsyncIterator[Bus]:
    async with running_backend(server.url, names=fresh_names()) as clients:
        yield Bus(clients)


def corrupt(key: str) -> str:
    """`key` with its last character changed: the checksum no longer matches."""
    return key[:-1] + ("B" if key.endswith("A") else "A")


async def assert_unchanged(bus: Bus, before: int) -> None:
    assert await bus.last_seq() == before, "a refused request appended an event"


# --- who may write ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_transit_key_may_write_and_each_event_records_it(bus: Bus) -> None:
    transit, identity = bus.transit, Identity()
    entity = identity.entity_key
    requests = [stamp(), stamp(), stamp()]
    assert await bus.send("put_secret", put_body("db", "hunter2", **requests[0]), transit) == (
        put_reply(1)
    )
    reply = await bus.send(f"add_mapping.{entity}", mapping_body(["db"], **requests[1]), transit)
    assert reply == OK
    assert await bus.can_get(identity, "db")
    reply = await bus.send(f"remove_mapping.{entity}", mapping_body(["db"], **requests[2]), transit)
    assert reply == OK
    assert not await bus.can_get(identity, "db")

    events = await bus.events()
    assert [type(event) for _, event in events] == [SecretPut, MappingAdded, MappingRemoved]
    for (_, event), request in zip(events, requests, strict=True):
        assert event.admin_key == transit.public_key
        assert event.authenticated is True
        assert event.request_id == request["request_id"]
    put = events[0][1]
    assert isinstance(put, SecretPut)
    assert (put.kind, put.name) == ("string", "db")
    encryption = bus.clients.keys.encryption
    assert encryption.open(put.sealed, encryption) == b"hunter2"
    data, _ = await bus.raw_event(1)
    assert b"hunter2" not in data  # the log holds the sealed value only
    added = events[1][1]
    assert isinstance(added, MappingAdded)
    assert (added.entity, added.secrets) == (entity, ("db",))


@pytest.mark.anyio
async def test_configured_admin_xkeys_may_write_and_are_recorded(server: NatsServer) -> None:
    alice, bob = XKey.generate(), XKey.generate()
    async with running_backend(
        server.url, names=fresh_names(), admin_xkeys=(alice.public_key, bob.public_key)
    ) as clients:
        bus, identity = Bus(clients), Identity()
        entity = identity.entity_key
        senders = [alice, bob, bus.transit, alice]
        requests = [stamp() for _ in senders]
        assert await bus.send("put_secret", put_body("s", b"\x00\xff", **requests[0]), alice) == (
            put_reply(1)
        )
        assert await bus.send("put_secret", put_body("s", "two", **requests[1]), bob) == (
            put_reply(2)
        )
        body = mapping_body(["s"], **requests[2])
        assert await bus.send(f"add_mapping.{entity}", body, bus.transit) == OK
        body = mapping_body(["s"], **requests[3])
        assert await bus.send(f"remove_mapping.{entity}", body, alice) == OK
        events = await bus.events()
        assert len(events) == 4
        for (_, event), sender, request in zip(events, senders, requests, strict=True):
            assert event.admin_key == sender.public_key
            assert event.authenticated is True
            assert event.request_id == request["request_id"]
        first = events[0][1]
        assert isinstance(first, SecretPut)
        assert first.kind == "binary"


@pytest.mark.anyio
async def test_any_other_key_is_refused_and_nothing_changes(server: NatsServer) -> None:
    admin = XKey.generate()
    async with running_backend(
        server.url, names=fresh_names(), admin_xkeys=(admin.public_key,)
    ) as clients:
        bus, identity = Bus(clients), Identity()
        entity = identity.entity_key
        assert await bus.send("put_secret", put_body("s", "v", **stamp()), admin) == put_reply(1)
        before = await bus.last_seq()
        stranger = XKey.generate()
        unauthorized_put = put_reply(0, "Unauthorized")
        assert await bus.send("put_secret", put_body("s", "evil", **stamp()), stranger) == (
            unauthorized_put
        )
        for operation in ("add_mapping", "remove_mapping"):
            body = mapping_body(["s"], **stamp())
            reply = await bus.send(f"{operation}.{entity}", body, stranger)
            assert reply == error_reply("Unauthorized"), operation
        # Claiming to be an admin key without its seed: the seal does not open.
        claimed = put_body("s", "evil", **stamp())
        reply = await bus.send("put_secret", claimed, stranger, header=admin.public_key)
        assert reply == put_reply(0, "DecryptionError")
        body = mapping_body(["s"], **stamp())
        reply = await bus.send(
            f"add_mapping.{entity}", body, stranger, header=bus.transit.public_key
        )
        assert reply == error_reply("DecryptionError")
        # An admin key sealing to some other key than the transit key.
        reply = await bus.send(
            "put_secret", put_body("s", "x", **stamp()), admin, to=XKey.generate().public_key
        )
        assert reply == put_reply(0, "DecryptionError")
        await assert_unchanged(bus, before)
        assert not await bus.can_get(identity, "s")
        assert (await clients.admin.list_secrets())[0].version == 1


@pytest.mark.anyio
async def test_issued_at_more_than_120s_away_is_refused(bus: Bus) -> None:
    transit, entity = bus.transit, Identity().entity_key
    before = await bus.last_seq()
    for offset in (-130, 130, -10_000, 10_000):
        reply = await bus.send("put_secret", put_body("s", "v", **stamp(offset)), transit)
        assert reply == put_reply(0, "Unauthorized"), offset
        for operation in ("add_mapping", "remove_mapping"):
            body = mapping_body(["s"], **stamp(offset))
            reply = await bus.send(f"{operation}.{entity}", body, transit)
            assert reply == error_reply("Unauthorized"), (operation, offset)
    reply = await bus.send("put_secret", put_body("s", "v", request_id="r", issued_at=0), transit)
    assert reply == put_reply(0, "Unauthorized")
    await assert_unchanged(bus, before)
    # Inside the window, in either direction, is accepted.
    assert await bus.send("put_secret", put_body("s", "v", **stamp(-60)), transit) == put_reply(1)
    body = mapping_body(["s"], **stamp(60))
    assert await bus.send(f"add_mapping.{entity}", body, transit) == OK


@pytest.mark.anyio
async def test_a_replayed_request_is_applied_once(bus: Bus) -> None:
    transit, identity = bus.transit, Identity()
    entity = identity.entity_key
    put = bus.seal(put_body("s", "first", **stamp()), transit, bound_to="put_secret")
    first = await bus.raw("put_secret", *put)
    assert first == put_reply(1)
    seq = await bus.last_seq()
    assert await bus.raw("put_secret", *put) == first
    assert await bus.last_seq() == seq

    add = bus.seal(mapping_body(["s"], **stamp()), transit, bound_to=f"add_mapping.{entity}")
    assert await bus.raw(f"add_mapping.{entity}", *add) == OK
    seq = await bus.last_seq()
    assert await bus.raw(f"add_mapping.{entity}", *add) == OK
    assert await bus.last_seq() == seq

    # Replays after newer writes change nothing either: no roll-back, no re-grant.
    assert await bus.send("put_secret", put_body("s", "second", **stamp()), transit) == (
        put_reply(2)
    )
    body = mapping_body(["s"], **stamp())
    assert await bus.send(f"remove_mapping.{entity}", body, transit) == OK
    seq = await bus.last_seq()
    assert await bus.raw("put_secret", *put) == first
    assert await bus.raw(f"add_mapping.{entity}", *add) == OK
    assert await bus.last_seq() == seq
    assert not await bus.can_get(identity, "s")
    await bus.clients.admin.add_mapping(entity, ["s"])
    secret = await bus.clients.get(identity, "s")
    assert (secret.version, secret.string_secret) == ("2", "second")


# --- what a valid admin may not write ---------------------------------------------------------


@pytest.mark.anyio
async def test_put_needs_exactly_one_value(bus: Bus) -> None:
    before = await bus.last_seq()
    neither = put_body("s", None, **stamp())
    both = json.dumps(
        {"key": "s", "version": "", "string_secret": "a", "binary_secret": [1], **stamp()}
    ).encode()
    omitted = json.dumps({"key": "s", **stamp()}).encode()
    for body in (neither, both, omitted):
        reply = await bus.send("put_secret", body, bus.transit)
        assert reply == put_reply(0, "NoSecretProvided"), body
    await assert_unchanged(bus, before)


INVALID_NAMES = [
    "a..b",
    ".a",
    "a.",
    "a b",
    "*",
    ">",
    "a.*",
    "a.>",
    "",
    "x" * 300,
    "x" * 256,
    "_secrets-nats-kv",
    "_secrets-nats-kv_erased",
    "caf\u00e9",
    "a\nb",
    "a\x00b",
]


@pytest.mark.anyio
async def test_invalid_secret_names_are_refused_and_nothing_is_stored(bus: Bus) -> None:
    entity = Identity().entity_key
    before = await bus.last_seq()
    for name in INVALID_NAMES:
        reply = await bus.send("put_secret", put_body(name, "v", **stamp()), bus.transit)
        assert reply == put_reply(0, "InvalidRequest"), name
        body = mapping_body(["ok-name", name], **stamp())
        reply = await bus.send(f"add_mapping.{entity}", body, bus.transit)
        assert reply == error_reply("InvalidRequest"), name
    await assert_unchanged(bus, before)
    assert await bus.clients.admin.list_secrets() == []


@pytest.mark.anyio
async def test_names_at_the_edge_of_the_rules_are_accepted(bus: Bus) -> None:
    identity = Identity()
    names = ["x" * 255, "a/b=c_d-e.f", "A", "0", "_secrets-nats-k", "a.b.c"]
    for revision, name in enumerate(names, start=1):
        assert await bus.send("put_secret", put_body(name, name, **stamp()), bus.transit) == (
            put_reply(revision)
        ), name
    await bus.clients.admin.add_mapping(identity.entity_key, names)
    for name in names:
        assert (await bus.clients.get(identity, name)).string_secret == name


@pytest.mark.anyio
async def test_malformed_mapping_requests_are_refused(bus: Bus) -> None:
    transit = bus.transit
    body = mapping_body(["s"], **stamp())
    before = await bus.last_seq()
    not_entities = [
        SigningKey.generate(Role.ACCOUNT).public_key,
        SigningKey.generate(Role.SERVER).public_key,
        SigningKey.generate(Role.USER).public_key,
        XKey.generate().public_key,
        "garbage",
        corrupt(Identity().entity_key),
        "MABC",
    ]
    for entity in not_entities:
        for operation in ("add_mapping", "remove_mapping"):
            reply = await bus.send(f"{operation}.{entity}", body, transit)
            assert reply == error_reply("InvalidRequest"), (operation, entity)
    entity = Identity().entity_key
    # A subject with extra tokens after the entity names no entity.
    reply = await bus.send(f"add_mapping.{entity}.extra", body, transit)
    assert reply == error_reply("InvalidRequest")
    for operation in ("add_mapping", "remove_mapping"):
        assert await bus.send(operation, body, transit) == b"invalid subject"
        empty = mapping_body([], **stamp())
        reply = await bus.send(f"{operation}.{entity}", empty, transit)
        assert reply == error_reply("InvalidRequest"), operation
        # The original's bare list is not the admin form.
        reply = await bus.send(f"{operation}.{entity}", b'["s"]', transit)
        assert reply == error_reply("InvalidRequest"), operation
    await assert_unchanged(bus, before)


@pytest.mark.anyio
async def test_malformed_admin_requests_are_refused(bus: Bus) -> None:
    transit, entity = bus.transit, Identity().entity_key
    before = await bus.last_seq()
    now = int(time.time())
    bad_bodies = [
        b"not json",
        b"",
        put_body("s", "v"),  # the original's form: no request_id, no issued_at
        put_body("s", "v", request_id="", issued_at=now),
        put_body("s", "v", request_id="r", issued_at=-5),
        put_body("s", "v", request_id="r", issued_at="now"),
        put_body("s", "v", request_id=7, issued_at=now),
        json.dumps({"key": "s", "string_secret": 5, **stamp()}).encode(),
        json.dumps({"key": "s", "binary_secret": [256], **stamp()}).encode(),
        json.dumps({"key": "s", "binary_secret": [-1], **stamp()}).encode(),
        b'{"key":"s\xff","string_secret":"v","request_id":"r","issued_at":%d}' % now,
    ]
    for body in bad_bodies:
        reply = await bus.send("put_secret", body, transit)
        assert reply == put_reply(0, "InvalidRequest"), body
    for body in (mapping_body(["s"]), mapping_body(["s"], request_id="", issued_at=now)):
        reply = await bus.send(f"add_mapping.{entity}", body, transit)
        assert reply == error_reply("InvalidRequest"), body
    # The envelope, as PROTOCOL §5 lists the put errors.
    sealed, headers = bus.seal(put_body("s", "v", **stamp()), transit)
    assert await bus.raw("put_secret", b"", headers) == put_reply(0, "InvalidPayload")
    assert await bus.raw("put_secret", sealed) == put_reply(0, "InvalidHeaders")
    assert await bus.raw("put_secret", sealed, {"Other": "x"}) == put_reply(0, "InvalidXKey")
    bad_key = {HOST_XKEY: "not-a-key"}
    assert await bus.raw("put_secret", sealed, bad_key) == put_reply(0, "InvalidXKey")
    assert await bus.raw("put_secret", b"garbage", headers) == put_reply(0, "DecryptionError")
    for operation in (f"add_mapping.{entity}", f"remove_mapping.{entity}"):
        assert await bus.raw(operation, b"", headers) == error_reply("InvalidPayload")
        assert await bus.raw(operation, sealed) == error_reply("InvalidHeaders")
        assert await bus.raw(operation, sealed, bad_key) == error_reply("InvalidXKey")
    await assert_unchanged(bus, before)
    assert await bus.clients.admin.put_secret("s", "fine") == 1


@pytest.mark.anyio
async def test_oversized_requests_are_refused_and_the_backend_lives(bus: Bus) -> None:
    transit, admin = bus.transit, bus.clients.admin
    before = await bus.last_seq()
    huge = put_body("big", "x" * (bus.nc.max_payload + 1), **stamp())
    with pytest.raises(nats.errors.MaxPayloadError):
        await bus.send("put_secret", huge, transit)
    # Fits in a request, but its event (the value sealed, then base64 in JSON) cannot.
    near = put_body("big", "x" * (bus.nc.max_payload * 8 // 10), **stamp())
    reply = msgspec.json.decode(await bus.send("put_secret", near, transit))
    assert reply["revision"] == 0
    assert reply["error"] is not None
    await assert_unchanged(bus, before)
    assert await admin.put_secret("small", "fits") == 1
    identity = Identity()
    await admin.add_mapping(identity.entity_key, ["small"])
    assert (await bus.clients.get(identity, "small")).string_secret == "fits"


@pytest.mark.anyio
async def test_writes_without_a_reply_subject_are_dropped(bus: Bus) -> None:
    """PROTOCOL §2: no reply subject, no request; nothing is stored."""
    pool = bus.clients.backend.pool
    assert pool is not None
    before, dropped = await bus.last_seq(), pool.stats.dropped_no_reply
    entity = Identity().entity_key
    await bus.nc.publish(
        bus.names.subject("put_secret"),
        *_args(bus.seal(put_body("s", "v", **stamp()), bus.transit, bound_to="put_secret")),
    )
    await bus.nc.publish(
        bus.names.subject(f"add_mapping.{entity}"),
        *_args(
            bus.seal(mapping_body(["s"], **stamp()), bus.transit, bound_to=f"add_mapping.{entity}")
        ),
    )
    await bus.nc.flush()
    deadline = time.monotonic() + 5
    while pool.stats.dropped_no_reply < dropped + 2:  # no event marks a drop: bounded poll
        assert time.monotonic() < deadline, "the requests were not dropped"
        await anyio.sleep(0.01)
    await assert_unchanged(bus, before)


def _args(sealed: tuple[bytes, dict[str, str]]) -> tuple[bytes, str, dict[str, str]]:
    payload, headers = sealed
    return payload, "", headers


# --- --insecure-unauthenticated-admin ---------------------------------------------------------


@pytest.fixture
async def insecure(server: NatsServer) -> AsyncIterator[Bus]:
    async with running_backend(
        server.url, names=fresh_names(), insecure_unauthenticated_admin=True
    ) as clients:
        yield Bus(clients)


@pytest.mark.anyio
async def test_insecure_mode_accepts_the_originals_forms(insecure: Bus) -> None:
    bus, identity, anyone = insecure, Identity(), XKey.generate()
    entity = identity.entity_key
    original_put = put_body("s", "v1")  # exactly the original's four keys
    assert await bus.send("put_secret", original_put, anyone) == put_reply(1)
    assert await bus.raw(f"add_mapping.{entity}", b'["s"]') == OK  # bare array, no headers
    assert await bus.can_get(identity, "s")
    assert await bus.raw(f"remove_mapping.{entity}", b'["s"]') == OK
    assert not await bus.can_get(identity, "s")
    events = await bus.events()
    assert [type(event) for _, event in events] == [SecretPut, MappingAdded, MappingRemoved]
    assert all(event.authenticated is False for _, event in events)
    assert events[0][1].admin_key == anyone.public_key
    assert [event.admin_key for _, event in events[1:]] == ["", ""]
    # Still answered with the protocol's errors, storing nothing.
    before = await bus.last_seq()
    assert await bus.send("put_secret", put_body("s", None), anyone) == put_reply(
        0, "NoSecretProvided"
    )
    assert await bus.send("put_secret", put_body("a..b", "v"), anyone) == put_reply(
        0, "InvalidRequest"
    )
    assert await bus.raw(f"add_mapping.{entity}", b"[]") == error_reply("InvalidRequest")
    assert await bus.raw(f"add_mapping.{entity}", b"{}") == error_reply("InvalidRequest")
    assert await bus.raw("add_mapping.garbage", b'["s"]') == error_reply("InvalidRequest")
    await assert_unchanged(bus, before)


@pytest.mark.anyio
async def test_the_originals_forms_are_refused_by_default(bus: Bus) -> None:
    anyone, entity = XKey.generate(), Identity().entity_key
    before = await bus.last_seq()
    assert await bus.send("put_secret", put_body("s", "v"), anyone) == put_reply(0, "Unauthorized")
    assert await bus.raw(f"add_mapping.{entity}", b'["s"]') == error_reply("InvalidHeaders")
    assert await bus.raw(f"add_mapping.{entity}", b'["s"]', {HOST_XKEY: anyone.public_key}) == (
        error_reply("Unauthorized")
    )
    await assert_unchanged(bus, before)


@pytest.mark.anyio
async def test_insecure_mode_keeps_admin_requests_authenticated(insecure: Bus) -> None:
    """An admin key's request keeps its replay protection and is recorded as authenticated."""
    bus, identity = insecure, Identity()
    admin = bus.clients.admin  # the project's own client: sealed admin forms
    assert await admin.put_secret("s", "v") == 1
    await admin.add_mapping(identity.entity_key, ["s"])
    assert await bus.can_get(identity, "s")
    put = bus.seal(put_body("s", "again", **stamp()), bus.transit, bound_to="put_secret")
    assert await bus.raw("put_secret", *put) == put_reply(2)
    assert await bus.raw("put_secret", *put) == put_reply(2)  # applied once
    stale = put_body("s", "stale", **stamp(-1000))
    assert await bus.send("put_secret", stale, bus.transit) == put_reply(0, "Unauthorized")
    events = await bus.events()
    assert len(events) == 3
    assert all(event.authenticated and event.request_id for _, event in events)
    assert all(event.admin_key == bus.transit.public_key for _, event in events)


@pytest.mark.anyio
async def test_insecure_mode_opens_no_other_operation_to_strangers(insecure: Bus) -> None:
    """The flag lets anyone do what the original let anyone do, no more (no delete, list…)."""
    bus, stranger = insecure, XKey.generate()
    assert await bus.clients.admin.put_secret("s", "v") == 1
    before = await bus.last_seq()
    request = wire.AdminRequest(name="s", **stamp())
    for operation in ("delete", "destroy", "list", "mappings"):
        body = wire.encode_admin_request(request)
        reply = await bus.send(operation, body, stranger)
        assert reply == error_reply("Unauthorized"), operation
    await assert_unchanged(bus, before)
    assert (await bus.clients.admin.list_secrets())[0].version == 1


# --- forged and replayed events ---------------------------------------------------------------


async def publish_forged(bus: Bus, subject: str, body: bytes, headers: dict[str, str]) -> int:
    """Append a message straight onto the event stream, as anyone on the bus could."""
    ack = await bus.nc.jetstream().publish(subject, body, stream=bus.stream, headers=headers)
    return ack.seq


@pytest.mark.anyio
async def test_forged_mapping_events_grant_nothing(bus: Bus) -> None:
    admin, identity = bus.clients.admin, Identity()
    entity = identity.entity_key
    assert await admin.put_secret("s", "v") == 1
    forged = encode_event(
        MappingAdded(
            at=time.time(),
            admin_key=bus.transit.public_key,
            request_id=uuid.uuid4().hex,
            entity=entity,
            secrets=("s",),
        )
    )
    subject = bus.event_subject(f"mapping.{entity}")
    stranger_tags = Barrier(XKey.generate())
    next_seq = await bus.last_seq() + 1
    await publish_forged(bus, subject, forged, {})
    await publish_forged(bus, subject, forged, {TAG_HEADER: "0" * 64})
    await publish_forged(bus, subject, forged, {TAG_HEADER: "not hex"})
    # The right position, tagged with some other key.
    last = await publish_forged(
        bus, subject, forged, {TAG_HEADER: stranger_tags.tag(next_seq + 3, forged)}
    )
    assert last == next_seq + 3
    assert not await bus.can_get(identity, "s")
    assert entity not in await admin.mappings()
    # Legitimate writes go on, at the right revisions, after the forgeries.
    assert await admin.put_secret("s", "v2") == 2
    other = Identity()
    await admin.add_mapping(other.entity_key, ["s"])
    secret = await bus.clients.get(other, "s")
    assert (secret.version, secret.string_secret) == ("2", "v2")
    assert not await bus.can_get(identity, "s")
    # Control: the same forged bytes, tagged and linked with the real key for where they
    # land, are folded. So the refusals above came from the tags, not a publish that missed.
    real = EventLog(
        bus.nc, backend_name=bus.names.name, barrier=Barrier(bus.clients.keys.encryption)
    )
    entries = await real.read_all()
    link = next(entry.link for entry in reversed(entries) if entry.link)
    encoded = EventCodec(Barrier(bus.clients.keys.encryption)).encode_body(
        forged, entries[-1].seq + 1, link
    )
    assert await publish_forged(bus, subject, forged, encoded.headers)
    assert await bus.can_get(identity, "s")


@pytest.mark.anyio
async def test_a_real_event_replayed_later_is_ignored(bus: Bus) -> None:
    admin, identity = bus.clients.admin, Identity()
    entity = identity.entity_key
    assert await admin.put_secret("s", "old") == 1
    await admin.add_mapping(entity, ["s"])
    put_seq, add_seq = 1, 2
    await admin.remove_mapping(entity, ["s"])
    assert await admin.put_secret("s", "new") == 2
    for seq, kind, suffix in (
        (add_seq, MappingAdded, f"mapping.{entity}"),
        (put_seq, SecretPut, "secret.s"),
    ):
        data, headers = await bus.raw_event(seq)
        assert isinstance(decode_event(data), kind)
        subject = bus.event_subject(suffix)
        # Bytes and tag as stored; the stream's own guards (expected sequence, msg id) are
        # left out, so the copy does land, at a later position than it was tagged for.
        await publish_forged(bus, subject, data, {TAG_HEADER: headers[TAG_HEADER]})
    assert not await bus.can_get(identity, "s")
    await admin.add_mapping(entity, ["s"])
    secret = await bus.clients.get(identity, "s")
    assert (secret.version, secret.string_secret) == ("2", "new")
    # The replayed put did not count as a revision: the next put is 3, in the KV bucket too.
    assert await admin.put_secret("s", "newer") == 3
    bucket = bus.names.secrets_bucket
    entry = await bus.nc.jetstream().get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.s")
    assert entry.seq == 3


@pytest.mark.anyio
async def test_forgeries_stay_ignored_when_a_backend_folds_the_log_afresh(
    server: NatsServer,
) -> None:
    names, identity = fresh_names(), Identity()
    entity = identity.entity_key
    async with running_backend(server.url, names=names) as clients:
        keys, bus = clients.keys, Bus(clients)
        assert await clients.admin.put_secret("s", "v") == 1
        forged = encode_event(MappingAdded(at=time.time(), entity=entity, secrets=("s",)))
        await publish_forged(bus, bus.event_subject(f"mapping.{entity}"), forged, {})
    async with running_backend(server.url, keys, names=names) as clients:
        bus = Bus(clients)
        assert not await bus.can_get(identity, "s")
        assert await clients.admin.put_secret("s", "v2") == 2
        await clients.admin.add_mapping(entity, ["s"])
        secret = await clients.get(identity, "s")
        assert (secret.version, secret.string_secret) == ("2", "v2")


# --- properties -------------------------------------------------------------------------------


def valid_name(name: str) -> bool:
    """PROTOCOL.md §6 and the reserved prefix, restated independently of naming.py."""
    return (
        re.fullmatch(r"[-/_=.A-Za-z0-9]{1,255}", name) is not None
        and not name.startswith(".")
        and not name.endswith(".")
        and ".." not in name
        and not name.startswith("_secrets-nats-kv")
    )


name_text = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab.-_/=*> \t", max_size=8),
    st.sampled_from(["_secrets-nats-kv", "_secrets-nats-kvx", "_secrets-nats-k"]),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=name_text)
@pytest.mark.anyio
async def test_any_name_is_stored_if_and_only_if_it_is_valid(bus: Bus, name: str) -> None:
    before = await bus.last_seq()
    reply = wire.decode_put_response(
        await bus.send("put_secret", put_body(name, "v", **stamp()), bus.transit)
    )
    if valid_name(name):
        assert reply.error is None
        assert reply.revision > 0
        assert await bus.last_seq() == before + 1
    else:
        assert (reply.revision, reply.error) == (0, "InvalidRequest")
        await assert_unchanged(bus, before)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    operation=st.sampled_from(["put_secret", "add_mapping", "remove_mapping"]),
    body=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n: put_body(n, "v", **stamp()), st.sampled_from(["s", "t"])),
        st.builds(lambda n: mapping_body([n], **stamp()), st.sampled_from(["s", "t"])),
    ),
)
@pytest.mark.anyio
async def test_no_key_but_an_admin_key_changes_anything(
    bus: Bus, operation: str, body: bytes
) -> None:
    """Whatever a stranger seals, in whatever shape, the log stays as it was."""
    before = await bus.last_seq()
    if operation != "put_secret":
        operation += "." + Identity().entity_key
    reply = await bus.send(operation, body, XKey.generate())
    assert json.loads(reply)["error"] == "Unauthorized"
    await assert_unchanged(bus, before)
