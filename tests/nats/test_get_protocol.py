"""The wasmCloud `get` path, played exactly as a wasmCloud host plays it (PROTOCOL.md §3, §7).

Requests are built by hand here (JSON text, xkv1 seals, raw `nc.request`), not with the
project's own client, so the test pins the bytes a real host sends and receives: an error
is a plain `{"error": E}` without `Server-Response-Xkey`, a success is sealed from a fresh
server key named in that header. Several tests send requests that fail more than one check
at once: the error the host sees proves the order of the checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.backend import Backend
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.harness import (
    Clients,
    Identity,
    Keys,
    backend_config,
    fresh_names,
    running_backend,
)
from support.tokens import encode_jwt, mint_host_jwt

HOST_XKEY = "WasmCloud-Host-Xkey"
RESPONSE_XKEY = "Server-Response-Xkey"
U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def server(module_nats_server: NatsServer) -> NatsServer:
    """The module's shared server (see conftest); tests isolate with `fresh_names`."""
    return module_nats_server


# --- a wasmCloud host, by hand ----------------------------------------------------------------


def request_json(
    key: str,
    *,
    entity_jwt: str,
    host_jwt: str,
    field: str | None = None,
    version: str | None = None,
) -> bytes:
    """A `SecretRequest` as PROTOCOL.md §3 writes it, every key present."""
    return json.dumps(
        {
            "key": key,
            "field": field,
            "version": version,
            "context": {
                "entity_jwt": entity_jwt,
                "host_jwt": host_jwt,
                "application": {"name": "dog-app", "policy": ""},
            },
        }
    ).encode()


def body_for(identity: Identity, key: str, **kwargs: Any) -> bytes:
    return request_json(
        key, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt(), **kwargs
    )


def secret_json(version: int, value: str | bytes) -> bytes:
    """The exact reply body the original sends (serde_json: no spaces, both fields)."""
    string, binary = (value, None) if isinstance(value, str) else (None, list(value))
    return json.dumps(
        {"secret": {"version": str(version), "string_secret": string, "binary_secret": binary}},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def error_bytes(variant: str) -> bytes:
    return b'{"error":"' + variant.encode() + b'"}'


@dataclass
class Host:
    """A host on a raw connection: `server_xkey` once, then a fresh xkey per `get`."""

    nc: NATS
    names: BackendNames
    transit: str = ""

    async def raw(
        self, operation: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        return await self.nc.request(
            self.names.subject(operation), payload, timeout=5, headers=headers
        )

    async def fetch_server_xkey(self) -> str:
        self.transit = (await self.raw("server_xkey", b"")).data.decode()
        return self.transit

    async def sealed_get(self, body: bytes) -> tuple[Msg, XKey]:
        """Seal `body` from a fresh key to the transit key, as a host does for every get."""
        if not self.transit:
            await self.fetch_server_xkey()
        host_key = XKey.generate()
        sealed = host_key.seal(body, self.transit)
        return await self.raw("get", sealed, {HOST_XKEY: host_key.public_key}), host_key

    async def secret(self, body: bytes) -> bytes:
        """A successful get's opened reply; fails the test on a plain (error) reply."""
        msg, host_key = await self.sealed_get(body)
        return open_success(msg, host_key, self.transit)

    async def error(self, body: bytes) -> Any:
        """The `error` value of a failed get (a well-formed body, sealed correctly)."""
        msg, _ = await self.sealed_get(body)
        return plain_error(msg)


def open_success(msg: Msg, host_key: XKey, transit: str) -> bytes:
    headers = msg.headers or {}
    assert RESPONSE_XKEY in headers, f"not a success: {msg.data!r}"
    server_key = headers[RESPONSE_XKEY]
    assert re.fullmatch(r"X[A-Z2-7]{55}", server_key)
    assert server_key not in (transit, host_key.public_key)  # a fresh key of the backend's
    return host_key.open(msg.data, server_key)


def plain_error(msg: Msg) -> Any:
    """The error a reply carries; asserts it is plain JSON with no response-key header."""
    assert RESPONSE_XKEY not in (msg.headers or {}), "an error reply must not look sealed"
    value = json.loads(msg.data)
    assert isinstance(value, dict)
    assert list(value) == ["error"], value
    return value["error"]


@dataclass
class Served:
    """A running backend with one mapped secret: the survival check after a bad request."""

    clients: Clients
    host: Host
    identity: Identity
    name: str = "secret-foo"
    value: str = "sup3rs3cr3t"
    revision: int = 0

    async def assert_serving(self) -> None:
        reply = await self.host.secret(body_for(self.identity, self.name))
        assert reply == secret_json(self.revision, self.value)

    async def error_of(self, payload: bytes, headers: dict[str, str] | None) -> bytes:
        """Send a raw get and return its reply bytes, checked to be a plain error."""
        msg = await self.host.raw("get", payload, headers)
        plain_error(msg)
        return msg.data


@pytest.fixture
async def served(server: NatsServer) -> AsyncIterator[Served]:
    async with running_backend(server.url, names=fresh_names()) as clients:
        host = Host(clients.host.nc, clients.names)
        await host.fetch_server_xkey()
        state = Served(clients, host, Identity())
        state.revision = await clients.admin.put_secret(state.name, state.value)
        await clients.admin.add_mapping(state.identity.entity_key, [state.name])
        yield state


async def kv_entry(clients: Clients, name: str) -> tuple[int, bytes]:
    """The revision and stored bytes of `name`'s newest entry in the secrets bucket."""
    bucket = clients.names.secrets_bucket
    js = clients.host.nc.jetstream()
    raw = await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{name}")
    assert raw.seq is not None
    assert raw.data is not None
    return raw.seq, raw.data


def rust_u64(text: str) -> int | None:
    """Rust's `u64::from_str`, restated independently: optional '+', ASCII digits, in range."""
    if not re.fullmatch(r"\+?[0-9]+", text):
        return None
    value = int(text)
    return value if value <= U64_MAX else None


# --- server_xkey ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_xkey_is_the_transit_public_key(served: Served) -> None:
    transit = served.clients.keys.transit.public_key
    for payload, headers in ((b"", None), (b"anything", {"X-Other": "1"})):
        msg = await served.host.raw("server_xkey", payload, headers)
        assert msg.data == transit.encode()
        assert len(msg.data) == 56
        assert msg.data.startswith(b"X")
    assert XKey.from_public(transit).public_key == transit


@pytest.mark.anyio
async def test_a_started_backend_answers_at_once_from_another_connection(
    server: NatsServer,
) -> None:
    """Started means subscribed at the server: the very first request finds a responder.

    (Once failed in CI with "no responders" when the SUB was still in the client's buffer.)
    """
    keys = Keys()
    async with contextlib.AsyncExitStack() as stack:
        nc = await nats.connect(server.url)
        stack.push_async_callback(nc.close)
        for _ in range(10):
            names = fresh_names()
            backend = Backend(backend_config(server.url, keys, names=names))
            async with anyio.create_task_group() as tg:
                await tg.start(backend.run)
                reply = await nc.request(names.subject("server_xkey"), b"", timeout=5)
                backend.stop()
            assert reply.data == keys.transit.public_key.encode()


# --- successful gets --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_get_replies_sealed_exactly_as_the_original(served: Served) -> None:
    """The first put into an empty backend is revision 1; each reply uses a fresh key."""
    assert served.revision == 1
    body = body_for(served.identity, served.name)
    first, key_one = await served.host.sealed_get(body)
    second, key_two = await served.host.sealed_get(body)
    expected = b'{"secret":{"version":"1","string_secret":"sup3rs3cr3t","binary_secret":null}}'
    assert open_success(first, key_one, served.host.transit) == expected
    assert open_success(second, key_two, served.host.transit) == expected
    assert (first.headers or {})[RESPONSE_XKEY] != (second.headers or {})[RESPONSE_XKEY]
    assert b"sup3rs3cr3t" not in first.data  # sealed, not plain


@pytest.mark.anyio
async def test_the_shapes_a_host_may_send_are_accepted(served: Served) -> None:
    """`application.name` null with a real policy text; `field`/`version` keys left out."""
    identity = served.identity
    policy = json.dumps(
        {"type": "properties.secret.wasmcloud.dev/v1alpha1", "properties": {"backend": "x"}}
    )
    with_policy = json.dumps(
        {
            "key": served.name,
            "field": None,
            "version": None,
            "context": {
                "entity_jwt": identity.entity_jwt(),
                "host_jwt": identity.host_jwt(),
                "application": {"name": None, "policy": policy},
            },
        }
    ).encode()
    minimal = json.dumps(
        {
            "key": served.name,
            "context": {
                "entity_jwt": identity.entity_jwt(),
                "host_jwt": identity.host_jwt(),
                "application": {"name": "dog-app", "policy": ""},
            },
        }
    ).encode()
    for body in (with_policy, minimal):
        assert await served.host.secret(body) == secret_json(served.revision, served.value)


@pytest.mark.anyio
async def test_values_come_back_in_the_kind_they_were_stored(served: Served) -> None:
    admin, identity = served.clients.admin, served.identity
    cases: dict[str, str | bytes] = {
        "bin-all-bytes": bytes(range(256)),
        "bin-utf8": b"plain ascii bytes",  # valid UTF-8, still binary
        "bin-empty": b"",
        "str-unicode": "h\u00e9llo \u2713 \U0001f511",
        "str-empty": "",
        "str-json": '{"a":1}',
    }
    revisions = {name: await admin.put_secret(name, value) for name, value in cases.items()}
    await admin.add_mapping(identity.entity_key, list(cases))
    for name, value in cases.items():
        reply = await served.host.secret(body_for(identity, name))
        assert reply == secret_json(revisions[name], value)
        decoded = json.loads(reply)["secret"]
        if isinstance(value, bytes):
            assert decoded["string_secret"] is None
            assert bytes(decoded["binary_secret"]) == value
        else:
            assert decoded["binary_secret"] is None
            assert decoded["string_secret"] == value


@pytest.mark.anyio
async def test_versions_are_kv_revisions_and_can_be_pinned(served: Served) -> None:
    admin, host, identity = served.clients.admin, served.host, served.identity
    assert await admin.put_secret("other", b"\x00\x01") == 2  # every put raises the revision
    assert await admin.put_secret(served.name, "v3") == 3
    await admin.add_mapping(identity.entity_key, ["other"])
    assert await host.secret(body_for(identity, served.name)) == secret_json(3, "v3")
    for pinned in ("1", "01", "+1"):  # what Rust's u64::from_str accepts
        reply = await host.secret(body_for(identity, served.name, version=pinned))
        assert reply == secret_json(1, "sup3rs3cr3t")
    assert await host.secret(body_for(identity, "other", version="2")) == secret_json(
        2, b"\x00\x01"
    )
    # Revision 2 exists, but belongs to another secret; 0, 4 and u64::MAX do not exist.
    for missing in ("2", "0", "4", str(U64_MAX)):
        assert await host.error(body_for(identity, served.name, version=missing)) == (
            "SecretNotFound"
        )
    # The version is the revision of the secret's entry in the original's KV bucket.
    encryption = served.clients.keys.encryption
    for name, revision, value in ((served.name, 3, b"v3"), ("other", 2, b"\x00\x01")):
        kv_revision, stored = await kv_entry(served.clients, name)
        assert kv_revision == revision
        assert value not in stored or not value  # sealed at rest
        assert encryption.open(stored, encryption) == value


@pytest.mark.anyio
async def test_field_selects_a_member_of_a_json_object_secret(served: Served) -> None:
    admin, host, identity = served.clients.admin, served.host, served.identity
    document = '{"user":"alice","pass":"hunter2","port":5432,"nested":{"a":[1,2]}}'
    values: dict[str, str | bytes] = {
        "doc": document,
        "plain": "not json at all",
        "array": "[1, 2, 3]",
        "binary-json": document.encode(),
        "deep": "[" * 100_000,  # more nesting than any JSON parser's recursion allows
    }
    revisions = {name: await admin.put_secret(name, value) for name, value in values.items()}
    await admin.add_mapping(identity.entity_key, list(values))

    async def field(name: str, member: str) -> Any:
        reply = await host.secret(body_for(identity, name, field=member))
        return json.loads(reply)["secret"]

    assert (await field("doc", "pass"))["string_secret"] == "hunter2"
    assert (await field("doc", "user"))["string_secret"] == "alice"
    assert json.loads((await field("doc", "port"))["string_secret"]) == 5432
    assert json.loads((await field("doc", "nested"))["string_secret"]) == {"a": [1, 2]}
    assert await host.error(body_for(identity, "doc", field="missing")) == "SecretNotFound"
    # Ignored where there is no JSON object: plain text, a JSON array, binary values.
    assert (await field("plain", "pass"))["string_secret"] == "not json at all"
    assert (await field("array", "pass"))["string_secret"] == "[1, 2, 3]"
    reply = await host.secret(body_for(identity, "binary-json", field="pass"))
    assert reply == secret_json(revisions["binary-json"], document.encode())
    # A text too deeply nested to parse is not a JSON object either: the whole text.
    reply = await host.secret(body_for(identity, "deep", field="pass"))
    assert reply == secret_json(revisions["deep"], "[" * 100_000)
    await served.assert_serving()


@pytest.mark.anyio
async def test_provider_entities_work_like_components(served: Served) -> None:
    provider = Identity.provider()
    assert provider.entity_key.startswith("V")
    assert await served.host.error(body_for(provider, served.name)) == "Unauthorized"
    await served.clients.admin.add_mapping(provider.entity_key, [served.name])
    reply = await served.host.secret(body_for(provider, served.name))
    assert reply == secret_json(served.revision, served.value)


@pytest.mark.anyio
async def test_host_may_sign_its_own_jwt_without_trusted_issuers(served: Served) -> None:
    """PROTOCOL.md §4: a host-signed host JWT is accepted (the original only warns)."""
    identity = served.identity
    self_signed = mint_host_jwt(identity.host, identity.host.public_key)
    body = request_json(served.name, entity_jwt=identity.entity_jwt(), host_jwt=self_signed)
    assert await served.host.secret(body) == secret_json(served.revision, served.value)


@pytest.mark.anyio
async def test_remove_mapping_revokes_only_the_names_removed(served: Served) -> None:
    admin, host, identity = served.clients.admin, served.host, served.identity
    revision = await admin.put_secret("kept", "k")
    await admin.add_mapping(identity.entity_key, ["kept"])
    await admin.remove_mapping(identity.entity_key, [served.name])
    assert await host.error(body_for(identity, served.name)) == "Unauthorized"
    assert await host.secret(body_for(identity, "kept")) == secret_json(revision, "k")
    await admin.remove_mapping(identity.entity_key, ["kept"])
    assert await host.error(body_for(identity, "kept")) == "Unauthorized"


@pytest.mark.anyio
async def test_default_names_are_the_originals(nats_server: NatsServer) -> None:
    """Out of the box: subjects `wasmcloud.secrets.v1alpha1.nats-kv.*`, WASMCLOUD_SECRETS."""
    async with running_backend(nats_server.url) as clients:
        identity = Identity()
        revision = await clients.admin.put_secret("secret-foo", "sup3rs3cr3t")
        await clients.admin.add_mapping(identity.entity_key, ["secret-foo"])
        host_key = XKey.generate()
        nc = clients.host.nc
        transit = (await nc.request("wasmcloud.secrets.v1alpha1.nats-kv.server_xkey", b"")).data
        msg = await nc.request(
            "wasmcloud.secrets.v1alpha1.nats-kv.get",
            host_key.seal(body_for(identity, "secret-foo"), transit.decode()),
            headers={HOST_XKEY: host_key.public_key},
        )
        reply = open_success(msg, host_key, transit.decode())
        assert revision == 1
        assert reply == secret_json(revision, "sup3rs3cr3t")
        entry = await nc.jetstream().get_last_msg(
            "KV_WASMCLOUD_SECRETS", "$KV.WASMCLOUD_SECRETS.secret-foo"
        )
        assert entry.seq == revision


# --- errors before the request is opened ------------------------------------------------------


def _sealed(host: Host, sender: XKey, body: bytes = b"{}") -> bytes:
    return sender.seal(body, host.transit)


ENVELOPE_CASES: list[tuple[str, str, Any]] = [
    # (id, expected variant, build(host, identity) -> (payload, headers))
    ("empty-no-headers", "InvalidPayload", lambda h, i: (b"", None)),
    (
        "empty-with-xkey",
        "InvalidPayload",
        lambda h, i: (b"", {HOST_XKEY: XKey.generate().public_key}),
    ),
    ("no-headers", "InvalidHeaders", lambda h, i: (_sealed(h, XKey.generate()), None)),
    ("no-xkey-header", "InvalidXKey", lambda h, i: (b"xkv1 junk", {"Other": "x"})),
    ("xkey-empty", "InvalidXKey", lambda h, i: (b"xkv1 junk", {HOST_XKEY: ""})),
    ("xkey-garbage", "InvalidXKey", lambda h, i: (b"xkv1 junk", {HOST_XKEY: "hello"})),
    (
        "xkey-is-account-key",
        "InvalidXKey",
        lambda h, i: (b"xkv1 junk", {HOST_XKEY: i.account.public_key}),
    ),
    (
        "xkey-is-module-key",
        "InvalidXKey",
        lambda h, i: (b"xkv1 junk", {HOST_XKEY: i.entity_key}),
    ),
    (
        "xkey-bad-checksum",
        "InvalidXKey",
        lambda h, i: (b"xkv1 junk", {HOST_XKEY: _corrupt(XKey.generate().public_key)}),
    ),
    ("not-xkv1", "DecryptionError", lambda h, i: (b"garbage", _xkey_header())),
    ("header-only", "DecryptionError", lambda h, i: (b"xkv1" + bytes(24), _xkey_header())),
    (
        "sealed-to-wrong-key",
        "DecryptionError",
        lambda h, i: _sealed_to(XKey.generate().public_key, body_for(i, "secret-foo")),
    ),
    (
        "header-names-another-sender",
        "DecryptionError",
        lambda h, i: (
            _sealed(h, XKey.generate(), body_for(i, "secret-foo")),
            _xkey_header(),
        ),
    ),
    ("tampered", "DecryptionError", lambda h, i: _tampered(h, body_for(i, "secret-foo"))),
]


def _xkey_header() -> dict[str, str]:
    return {HOST_XKEY: XKey.generate().public_key}


def _corrupt(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def _sealed_to(recipient: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    sender = XKey.generate()
    return sender.seal(body, recipient), {HOST_XKEY: sender.public_key}


def _tampered(host: Host, body: bytes) -> tuple[bytes, dict[str, str]]:
    sender = XKey.generate()
    sealed = bytearray(sender.seal(body, host.transit))
    sealed[40] ^= 0x01
    return bytes(sealed), {HOST_XKEY: sender.public_key}


@pytest.mark.parametrize(
    ("variant", "build"),
    [pytest.param(variant, build, id=case) for case, variant, build in ENVELOPE_CASES],
)
@pytest.mark.anyio
async def test_envelope_errors_are_plain_and_exact(
    served: Served, variant: str, build: Any
) -> None:
    """Each check before the body is read, by itself; the responder survives each."""
    payload, headers = build(served.host, served.identity)
    assert await served.error_of(payload, headers) == error_bytes(variant)
    await served.assert_serving()


@pytest.mark.anyio
async def test_a_seed_in_the_xkey_header_is_refused_and_not_echoed(served: Served) -> None:
    seed = XKey.generate().seed
    reply = await served.error_of(b"xkv1 junk", {HOST_XKEY: seed})
    assert reply == error_bytes("InvalidXKey")
    assert seed.encode() not in reply


BAD_BODIES: list[tuple[str, bytes]] = [
    ("not-json", b"hello"),
    ("empty", b""),
    ("empty-object", b"{}"),
    ("array", b"[1,2]"),
    ("no-context", b'{"key":"secret-foo","field":null,"version":null}'),
    ("key-not-string", b'{"key":1,"context":{"entity_jwt":"a","host_jwt":"b"}}'),
    (
        "version-not-string",
        b'{"key":"secret-foo","version":1,"context":{"entity_jwt":"a","host_jwt":"b"}}',
    ),
    ("truncated", b'{"key":"secret-foo","context":{"entity_jwt":"a"'),
    (
        "invalid-utf8-in-string",
        b'{"key":"secret-\xff","context":{"entity_jwt":"a","host_jwt":"b"}}',
    ),
    ("deeply-nested", b'{"key":"k","extra":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]


@pytest.mark.parametrize("body", [pytest.param(body, id=case) for case, body in BAD_BODIES])
@pytest.mark.anyio
async def test_an_opened_body_that_is_not_a_secret_request(served: Served, body: bytes) -> None:
    msg, _ = await served.host.sealed_get(body)
    assert msg.data == error_bytes("InvalidRequest")
    plain_error(msg)
    await served.assert_serving()


# --- JWTs -------------------------------------------------------------------------------------


def _forged_signature(token: str, other: str) -> str:
    """`token` with the signature of another token: the claims no longer match it."""
    return token.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


def _signed_by_impostor(identity: Identity, *, host: bool) -> str:
    """Claims naming the real account as issuer, signed by another account's key."""
    impostor = SigningKey.generate(Role.ACCOUNT)
    subject = identity.host.public_key if host else identity.entity_key
    now = int(time.time())
    claims = {"jti": "X1", "iat": now, "iss": identity.account.public_key, "sub": subject}
    return encode_jwt(claims, impostor)


def jwt_cases(host: bool) -> list[Any]:
    now = int(time.time())

    def mint(identity: Identity, **claims: Any) -> str:
        return identity.host_jwt(**claims) if host else identity.entity_jwt(**claims)

    other_role = (
        (lambda i: i.entity_jwt()) if host else (lambda i: i.host_jwt())
    )  # a valid token of the wrong kind
    return [
        pytest.param(lambda i: mint(i, exp=now - 60), "expired", id="expired"),
        pytest.param(lambda i: mint(i, nbf=now + 3600), "not valid until", id="not-yet-valid"),
        pytest.param(
            lambda i: _forged_signature(mint(i), mint(Identity())), "signature", id="bad-signature"
        ),
        pytest.param(lambda i: _signed_by_impostor(i, host=host), "signature", id="impostor"),
        pytest.param(lambda i: "not.a.jwt", "malformed", id="garbage"),
        pytest.param(lambda i: "", "malformed", id="empty"),
        pytest.param(other_role, "subject", id="wrong-kind"),
    ]


@pytest.mark.parametrize(("make", "reason"), jwt_cases(host=False))
@pytest.mark.anyio
async def test_invalid_entity_jwt(served: Served, make: Any, reason: str) -> None:
    identity = served.identity
    token = make(identity)
    body = request_json(served.name, entity_jwt=token, host_jwt=identity.host_jwt())
    error = await served.host.error(body)
    assert list(error) == ["InvalidEntityJWT"]
    assert reason in error["InvalidEntityJWT"]
    assert not token or token not in error["InvalidEntityJWT"]
    await served.assert_serving()


@pytest.mark.parametrize(("make", "reason"), jwt_cases(host=True))
@pytest.mark.anyio
async def test_invalid_host_jwt(served: Served, make: Any, reason: str) -> None:
    identity = served.identity
    token = make(identity)
    body = request_json(served.name, entity_jwt=identity.entity_jwt(), host_jwt=token)
    error = await served.host.error(body)
    assert list(error) == ["InvalidHostJWT"]
    assert reason in error["InvalidHostJWT"]
    assert not token or token not in error["InvalidHostJWT"]
    await served.assert_serving()


@pytest.mark.anyio
async def test_trusted_issuers_refuse_tokens_from_other_accounts(server: NatsServer) -> None:
    trusted = SigningKey.generate(Role.ACCOUNT)
    async with running_backend(
        server.url, names=fresh_names(), trusted_issuers=(trusted.public_key,)
    ) as clients:
        host = Host(clients.host.nc, clients.names)
        ours, stranger = Identity(account=trusted), Identity()
        revision = await clients.admin.put_secret("s", "v")
        for identity in (ours, stranger):
            await clients.admin.add_mapping(identity.entity_key, ["s"])
        assert await host.secret(body_for(ours, "s")) == secret_json(revision, "v")

        error = await host.error(body_for(stranger, "s"))
        assert list(error) == ["InvalidEntityJWT"]
        assert stranger.account.public_key in error["InvalidEntityJWT"]

        foreign_host = stranger.host_jwt()  # our component, a host of another account
        body = request_json("s", entity_jwt=ours.entity_jwt(), host_jwt=foreign_host)
        error = await host.error(body)
        assert list(error) == ["InvalidHostJWT"]
        assert stranger.account.public_key in error["InvalidHostJWT"]

        self_signed = mint_host_jwt(ours.host, ours.host.public_key)
        body = request_json("s", entity_jwt=ours.entity_jwt(), host_jwt=self_signed)
        error = await host.error(body)
        assert list(error) == ["InvalidHostJWT"]
        assert ours.host.public_key in error["InvalidHostJWT"]

        assert await host.secret(body_for(ours, "s")) == secret_json(revision, "v")


# --- after the JWTs: mapping, version, secret ---------------------------------------------------


@pytest.mark.anyio
async def test_unmapped_or_unlisted_entity_is_unauthorized(served: Served) -> None:
    stranger = Identity()
    assert await served.host.error(body_for(stranger, served.name)) == "Unauthorized"
    await served.clients.admin.put_secret("other", "o")
    # Mapped, but not to this key; nor to a key that does not exist.
    assert await served.host.error(body_for(served.identity, "other")) == "Unauthorized"
    assert await served.host.error(body_for(served.identity, "nope")) == "Unauthorized"
    await served.assert_serving()


@pytest.mark.parametrize("version", ["abc", "-1", "1.0", " 1", "1 ", "", "+", "0x1", "\u0661"])
@pytest.mark.anyio
async def test_a_version_that_is_not_a_u64_is_invalid_request(served: Served, version: str) -> None:
    error = await served.host.error(body_for(served.identity, served.name, version=version))
    assert error == "InvalidRequest"
    await served.assert_serving()


@pytest.mark.anyio
async def test_version_past_u64_is_invalid_request(served: Served) -> None:
    for version in (str(U64_MAX + 1), "9" * 30, "1" * 5000):
        error = await served.host.error(body_for(served.identity, served.name, version=version))
        assert error == "InvalidRequest"
    await served.assert_serving()


@pytest.mark.anyio
async def test_unknown_secret_is_secret_not_found_once_mapped(served: Served) -> None:
    """The original lets a mapping name a secret not (yet) stored: then it is not found."""
    await served.clients.admin.add_mapping(served.identity.entity_key, ["later"])
    assert await served.host.error(body_for(served.identity, "later")) == "SecretNotFound"
    revision = await served.clients.admin.put_secret("later", "now")
    assert await served.host.secret(body_for(served.identity, "later")) == secret_json(
        revision, "now"
    )


@pytest.mark.anyio
async def test_checks_run_in_the_original_order(served: Served) -> None:
    """Requests failing several checks at once get the error of the earliest (PROTOCOL §3)."""
    host, identity = served.host, served.identity
    expired_entity = identity.entity_jwt(exp=int(time.time()) - 60)
    expired_host = identity.host_jwt(exp=int(time.time()) - 60)
    stranger = Identity()
    await served.clients.admin.add_mapping(identity.entity_key, ["mapped-missing"])

    # Envelope: payload, then headers, then the xkey header, then opening.
    assert await served.error_of(b"", None) == error_bytes("InvalidPayload")
    assert await served.error_of(b"", {"Other": "x"}) == error_bytes("InvalidPayload")
    assert await served.error_of(b"junk", None) == error_bytes("InvalidHeaders")
    assert await served.error_of(b"junk", {"Other": "x"}) == error_bytes("InvalidXKey")
    assert await served.error_of(b"junk", {HOST_XKEY: "X-bad"}) == error_bytes("InvalidXKey")
    assert await served.error_of(b"junk", _xkey_header()) == error_bytes("DecryptionError")

    def body(key: str, entity: str, host_jwt: str, version: str | None = None) -> bytes:
        return request_json(key, entity_jwt=entity, host_jwt=host_jwt, version=version)

    # Entity JWT before host JWT before mapping before version before existence.
    everything_wrong = body("nope", expired_entity, expired_host, "abc")
    assert list(await host.error(everything_wrong)) == ["InvalidEntityJWT"]
    host_and_rest = body("nope", identity.entity_jwt(), expired_host, "abc")
    assert list(await host.error(host_and_rest)) == ["InvalidHostJWT"]
    unmapped_bad_version = body_for(stranger, served.name, version="abc")
    assert await host.error(unmapped_bad_version) == "Unauthorized"
    unlisted_bad_version = body_for(identity, "nope", version="abc")
    assert await host.error(unlisted_bad_version) == "Unauthorized"
    mapped_bad_version_missing = body_for(identity, "mapped-missing", version="abc")
    assert await host.error(mapped_bad_version_missing) == "InvalidRequest"
    assert await host.error(body_for(identity, "mapped-missing", version="1")) == "SecretNotFound"
    # Asking for a field changes nothing: the version is still checked before existence.
    missing_field = body_for(identity, "mapped-missing", field="f", version="x")
    assert await host.error(missing_field) == "InvalidRequest"
    await served.assert_serving()


# --- operations and delivery -----------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_operation_is_named_in_the_reply(served: Served) -> None:
    for operation in ("frobnicate", "GET", "get_secret"):
        msg = await served.host.raw(operation, b"payload", _xkey_header())
        assert msg.data == f"unknown operation {operation}".encode()
    await served.assert_serving()


@pytest.mark.anyio
async def test_requests_without_a_reply_subject_are_dropped(served: Served) -> None:
    pool = served.clients.backend.pool
    assert pool is not None
    nc, names = served.host.nc, served.clients.names
    before = pool.stats.dropped_no_reply
    valid, host_key = body_for(served.identity, served.name), XKey.generate()
    await nc.publish(
        names.subject("get"),
        host_key.seal(valid, served.host.transit),
        headers={HOST_XKEY: host_key.public_key},
    )
    await nc.publish(names.subject("get"), b"")
    await nc.publish(names.subject("server_xkey"), b"")
    await nc.flush()
    deadline = time.monotonic() + 5
    while pool.stats.dropped_no_reply < before + 3:  # no event marks a drop: bounded poll
        assert time.monotonic() < deadline, "the requests were not dropped"
        await anyio.sleep(0.01)
    await served.assert_serving()


@pytest.mark.anyio
async def test_no_secret_or_token_reaches_a_log_or_an_error_reply(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    identity, host = served.identity, served.host
    value = "leaky-canary-value-8c1f"
    await served.clients.admin.put_secret("canary", value)
    await served.clients.admin.add_mapping(identity.entity_key, ["canary"])
    entity_jwt, host_jwt = identity.entity_jwt(), identity.host_jwt()
    expired = identity.entity_jwt(exp=int(time.time()) - 60)
    bodies = [
        request_json("canary", entity_jwt=entity_jwt, host_jwt=host_jwt),
        request_json("canary", entity_jwt=expired, host_jwt=host_jwt),
        request_json("canary", entity_jwt=entity_jwt, host_jwt=host_jwt, version="zz"),
        request_json("canary", entity_jwt=entity_jwt, host_jwt=host_jwt, field="f"),
        request_json("canary", entity_jwt=host_jwt, host_jwt=entity_jwt),
        b'{"key":"canary","context":{"entity_jwt":"' + entity_jwt.encode() + b'"}}',
    ]
    replies = []
    for body in bodies:
        msg, _ = await host.sealed_get(body)
        replies.append(msg)
    secrets = [value, entity_jwt, host_jwt, expired, served.clients.keys.transit.seed]
    secrets.append(served.clients.keys.encryption.seed)
    for msg in replies:
        assert not any(secret.encode() in msg.data for secret in secrets)
        if RESPONSE_XKEY not in (msg.headers or {}):
            plain_error(msg)
    assert sum(RESPONSE_XKEY in (msg.headers or {}) for msg in replies) == 2
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(map(str, vars(record).values()))
        assert not any(secret in text for secret in secrets), record.getMessage()


# --- properties -------------------------------------------------------------------------------


@pytest.fixture
async def clients(server: NatsServer) -> AsyncIterator[Clients]:
    async with running_backend(server.url, names=fresh_names()) as clients:
        yield clients


names = st.from_regex(
    r"[A-Za-z0-9][-/_=A-Za-z0-9]{0,20}(\.[-/_=A-Za-z0-9]{1,8}){0,2}", fullmatch=True
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=names, value=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
@pytest.mark.anyio
async def test_put_then_get_returns_the_value_kind_and_kv_revision(
    clients: Clients, name: str, value: str | bytes
) -> None:
    """For any value (empty ones too) and valid name: what was put is what a host gets."""
    identity = Identity()
    host = Host(clients.host.nc, clients.names)
    revision = await clients.admin.put_secret(name, value)
    await clients.admin.add_mapping(identity.entity_key, [name])
    secret = json.loads(await host.secret(body_for(identity, name)))["secret"]
    assert secret["version"] == str(revision)
    if isinstance(value, str):
        assert secret == {"version": str(revision), "string_secret": value, "binary_secret": None}
    else:
        assert secret["string_secret"] is None
        assert bytes(secret["binary_secret"]) == value
    kv_revision, stored = await kv_entry(clients, name)
    assert kv_revision == revision
    encryption = clients.keys.encryption
    assert encryption.open(stored, encryption) == (
        value.encode() if isinstance(value, str) else value
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    version=st.one_of(
        st.text(max_size=25),
        st.integers(min_value=0, max_value=U64_MAX + 10).map(str),
        st.integers(min_value=0, max_value=5).map(lambda n: "+" + "0" * n + "1"),
    )
)
@pytest.mark.anyio
async def test_any_version_text_is_found_not_found_or_invalid(served: Served, version: str) -> None:
    """Rust's u64 parse decides: revision 1 is found, other u64s not found, the rest invalid."""
    reply, host_key = await served.host.sealed_get(
        body_for(served.identity, served.name, version=version)
    )
    parsed = rust_u64(version)
    if parsed == served.revision:
        assert open_success(reply, host_key, served.host.transit) == secret_json(
            served.revision, served.value
        )
    elif parsed is None:
        assert reply.data == error_bytes("InvalidRequest")
    else:
        assert reply.data == error_bytes("SecretNotFound")


header_text = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=80
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(min_size=1, max_size=300), header=st.one_of(st.none(), header_text))
@pytest.mark.anyio
async def test_any_junk_gets_a_plain_error_and_the_responder_lives(
    served: Served, payload: bytes, header: str | None
) -> None:
    """Arbitrary bytes under an arbitrary (or a real) xkey header: never a crash, never sealed."""
    headers = {HOST_XKEY: header if header is not None else XKey.generate().public_key}
    reply = await served.error_of(payload, headers)
    expected = "DecryptionError" if header is None else "InvalidXKey"
    assert reply == error_bytes(expected)
    await served.assert_serving()
