"""Protocol fuzzing: every operation on the backend's subject, fed what a hostile or broken
client could send, must answer with the protocol's own reply shape and keep its state.

Layers, outside in: subjects (unknown operations, extra tokens), headers (missing, other
key roles, mangled keys, huge), payloads (empty, random, sealed to the wrong key), then
bodies sealed correctly but wrong inside (missing fields, wrong types, huge and empty
values, skewed clocks, bad names), and JWTs with mutated segments. Each case knows the
reply it must get: the exact error where the protocol fixes it (PROTOCOL.md §2, §3, §5),
else at least a well-formed one. A handler crash (the pool's `internal error`) fails the
case. After each run the canary secrets read back unchanged, a fresh put and get work, and
every put the fuzz got acknowledged reads back at its revision. The backend serves at most
two requests at once, so a request that wedged its slot stalls the run instead of hiding,
and every case first checks that the backend is still running.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import string
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats.errors
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from test_model import Refusal, parse_u64

from actors.backend import Backend
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.errors import TEXT_VARIANTS, UNIT_VARIANTS, InvalidKey
from secrets_nats_kv.naming import validate_entity
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey, encode_public, encode_seed
from secrets_nats_kv.wire import HOST_XKEY_HEADER, RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, backend_config, bind_request
from support.host import HostClient
from support.leakcheck import MIN_LENGTH, Needle, NeedleIndex, Registry, remember, searchable

LONG = os.environ.get("SECRETS_NATS_KV_LONG_TESTS") == "1"
SCALE = 6 if LONG else 1
REPLY_TIMEOUT = 10.0
SKEW_LIMIT = 120  # seconds an admin request's issued_at may be off (README "Who may write")

ADMIN_OPS = (
    "put_secret",
    "add_mapping",
    "remove_mapping",
    "list",
    "mappings",
    "delete",
    "undelete",
    "destroy",
)
OPS = ("server_xkey", "get", *ADMIN_OPS)
LIFECYCLE_OPS = ("list", "mappings", "delete", "undelete", "destroy")
PUT_ERRORS = {*UNIT_VARIANTS, *TEXT_VARIANTS, "NoSecretProvided"}
CANARY_STRING = "canary-string"
CANARY_BINARY = "canary-binary"

T = TypeVar("T")
Doc = dict[str, Any]


# --- cases and the meaning of replies -------------------------------------------------------


def short(value: object, limit: int = 300) -> str:
    """A repr cut to `limit` characters: falsifying examples carry 100 kB payloads."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


class ShortRepr:
    """Hypothesis prints a failing case through its own printer, which would spell out
    every field of a dataclass (hundreds of kB here); this makes it use `__repr__`."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass
class Case(ShortRepr):
    """One request and what it must get back."""

    kind: str  # for the counts
    operation: str  # the subject after the backend's prefix (operation and any argument)
    payload: bytes
    headers: dict[str, str] | None
    expected: str | None  # a variant, "ok", "secret", "xkey", "unknown", …
    host_key: XKey | None = None  # opens a sealed get reply
    secret: tuple[str, str, bytes] | None = None  # (version, kind, value) a success must carry
    written: tuple[str, bytes] | None = None  # a put that must succeed: (name, value)
    send_twice: bool = False  # an admin request replayed: the same reply, applied once
    note: str = ""  # how the case was made, for a failure's report

    def __repr__(self) -> str:
        return (
            f"Case({self.kind!r} {self.note!r}, {short(self.operation)}, "
            f"payload={len(self.payload)} bytes, "
            f"headers={short(self.headers)}, expected={self.expected!r})"
        )


@dataclass(frozen=True)
class Reply:
    data: bytes
    headers: dict[str, str]


def wire_variant(error: object) -> str:
    """The variant a wire `error` value names; asserts it is one the protocol defines."""
    if isinstance(error, str):
        assert error in UNIT_VARIANTS, f"unknown error value {error!r}"
        return error
    assert isinstance(error, dict), f"malformed error value {error!r}"
    assert len(error) == 1, f"malformed error value {error!r}"
    ((variant, text),) = error.items()
    variant = str(variant)
    assert variant in TEXT_VARIANTS, f"unknown error variant {variant!r}"
    assert isinstance(text, str), f"malformed error {error!r}"
    assert not (variant == "Other" and text.startswith("internal error")), (
        f"a handler crashed: {text}"
    )
    return variant


def json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise AssertionError(f"reply is not JSON: {data[:200]!r}") from None
    assert isinstance(value, dict), f"reply is not a JSON object: {data[:200]!r}"
    return value


def error_reply(data: bytes) -> str:
    """A plain `{"error": E}` reply (get, mapping and lifecycle failures)."""
    value = json_object(data)
    assert set(value) == {"error"}, f"error reply with other members: {sorted(value)}"
    return wire_variant(value["error"])


def meaning(case: Case, reply: Reply) -> str:
    """What `reply` says, asserting it has the shape its operation's replies have."""
    operation = case.operation.partition(".")[0]
    if operation not in OPS:
        assert reply.data == f"unknown operation {operation}".encode(), reply.data[:200]
        return "unknown"
    if operation == "server_xkey":
        XKey.from_public(reply.data.decode())
        return "xkey"
    if operation == "get":
        if RESPONSE_XKEY_HEADER not in reply.headers:
            return error_reply(reply.data)
        assert case.secret is not None, "a sealed (successful) reply to a request that must fail"
        assert case.host_key is not None
        secret = wire.decode_secret_response(
            case.host_key.open(reply.data, reply.headers[RESPONSE_XKEY_HEADER])
        )
        got = (
            secret.version,
            "binary" if secret.binary_secret is not None else "string",
            secret.value_bytes(),
        )
        assert got == case.secret, f"get answered version {secret.version} with other bytes"
        return "secret"
    if operation == "put_secret":
        value = json_object(reply.data)
        assert set(value) == {"revision", "error"}, f"not a PutSecretResponse: {sorted(value)}"
        revision, error = value["revision"], value["error"]
        assert isinstance(revision, int), revision
        assert revision >= 0, revision
        if error is None:
            assert revision > 0, "success with revision 0"
            return "ok"
        assert error in PUT_ERRORS, f"put error {error!r}"
        assert revision == 0, f"put error {error!r} with revision {revision}"
        return str(error)
    if operation in ("add_mapping", "remove_mapping"):
        if reply.data in (b"ok", b"invalid subject"):
            return reply.data.decode()
        return error_reply(reply.data)
    value = json_object(reply.data)
    if "error" in value:
        return error_reply(reply.data)
    shapes = {"list": {"secrets"}, "mappings": {"mappings"}}
    assert set(value) == shapes.get(operation, {"revision", "destroyed"}), sorted(value)
    return "ok"


# --- the backend under fuzz ----------------------------------------------------------------


@dataclass(repr=False)  # hypothesis shows strategies' arguments: keep this one short
class FuzzEnv(ShortRepr):
    """One backend (two requests at a time) on its own server, canaries stored before fuzz."""

    portal: BlockingPortal
    url: str
    keys: Keys = field(default_factory=Keys)
    reader: Identity = field(default_factory=Identity)  # mapped to the canaries
    stranger: Identity = field(default_factory=Identity)  # mapped to nothing
    counts: Counter[str] = field(default_factory=Counter)
    written: list[tuple[str, int, bytes]] = field(default_factory=list)
    canaries: dict[str, tuple[int, str | bytes]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FuzzEnv({self.url})"

    def start(self) -> None:
        remember(self.keys.transit.seed, "transit seed")
        remember(self.keys.encryption.seed, "encryption seed")
        self.config = backend_config(self.url, self.keys, request_concurrency=2)
        self.names = self.config.names
        self.backend = Backend(self.config)
        self.done: Future[None]
        self.done, _ = self.portal.start_task(self.backend.run)
        self.nc: NATS = self.call(
            lambda: connect(NatsOptions(servers=(self.url,)), name="fuzz", persistent=False)
        )
        self.admin = AdminClient(self.nc, self.names, self.keys.transit)
        self.host = HostClient(self.nc, self.names)
        self.tokens = {
            "reader": (self.reader.entity_jwt(), self.reader.host_jwt()),
            "stranger": (self.stranger.entity_jwt(), self.stranger.host_jwt()),
        }
        for pair in self.tokens.values():
            for token in pair:
                remember(token, "JWT")
        values: dict[str, str | bytes] = {
            CANARY_STRING: f"canary {uuid.uuid4()} ünïcode",
            CANARY_BINARY: os.urandom(48),
        }
        for name, value in values.items():
            remember(value, "canary")
            revision = self.call(functools.partial(self.admin.put_secret, name, value))
            self.canaries[name] = (revision, value)
        self.call(lambda: self.admin.add_mapping(self.reader.entity_key, list(values)))
        self.plaintexts = [
            v.encode() if isinstance(v, str) else v for _, v in self.canaries.values()
        ] + [self.keys.transit.seed.encode(), self.keys.encryption.seed.encode()]

    def stop(self) -> None:
        try:
            self.portal.call(self.backend.stop)
            self.done.result(timeout=30)
        finally:
            self.portal.call(self.nc.close)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def bounded() -> Any:
            with anyio.fail_after(60):
                return await fn()

        return self.portal.call(bounded)

    def request(self, operation: str, payload: bytes, headers: dict[str, str] | None) -> Reply:
        subject = self.names.subject(operation)

        async def send() -> Reply:
            try:
                msg = await self.nc.request(
                    subject, payload, timeout=REPLY_TIMEOUT, headers=headers
                )
            except nats.errors.TimeoutError:
                raise AssertionError(f"no reply on {subject} within {REPLY_TIMEOUT}s") from None
            return Reply(msg.data, dict(msg.headers or {}))

        return self.portal.call(send)

    def check(self, case: Case) -> None:
        """Send the case and hold the reply to what it must be."""
        assert not self.done.done(), "the backend has stopped"
        self.counts[case.kind] += 1
        reply = self.request(case.operation, case.payload, case.headers)
        for plaintext in self.plaintexts:
            assert plaintext not in reply.data, "a reply carries a canary value or a seed"
        got = meaning(case, reply)
        wanted = case.expected
        if wanted is not None:
            assert got == wanted, f"{case.kind} on {case.operation[:60]}: got {got}, want {wanted}"
        if case.send_twice:
            again = self.request(case.operation, case.payload, case.headers)
            assert again.data == reply.data, "a replayed admin request was answered differently"
        if case.written is not None and got == "ok":
            name, value = case.written
            self.written.append((name, json_object(reply.data)["revision"], value))

    def assert_intact(self) -> None:
        """Nothing the fuzz sent changed what was stored before it, and writing still works."""
        assert not self.done.done(), "the backend has stopped"

        async def verify() -> None:
            reader_jwt, host_jwt = self.tokens["reader"]
            for name, (revision, value) in self.canaries.items():
                secret = await self.host.get(name, entity_jwt=reader_jwt, host_jwt=host_jwt)
                assert secret.version == str(revision), f"{name} moved to {secret.version}"
                plain = value.encode() if isinstance(value, str) else value
                assert secret.value_bytes() == plain, f"{name} changed"
            mapped = await self.admin.mappings(self.reader.entity_key)
            assert mapped == {self.reader.entity_key: sorted(self.canaries)}
            fresh = f"after-fuzz {uuid.uuid4()}"
            remember(fresh)
            revision = await self.admin.put_secret("after-fuzz", fresh)
            written = {name for name, _, _ in self.written}
            await self.admin.add_mapping(self.stranger.entity_key, ["after-fuzz", *written])
            stranger_jwt, stranger_host = self.tokens["stranger"]
            got = await self.host.get("after-fuzz", entity_jwt=stranger_jwt, host_jwt=stranger_host)
            assert (got.version, got.string_secret) == (str(revision), fresh)
            for name, at, value in self.written:  # every acknowledged fuzz put, at its revision
                got = await self.host.get(
                    name, entity_jwt=stranger_jwt, host_jwt=stranger_host, version=str(at)
                )
                assert got.value_bytes() == value, f"fuzz put {name}@{at} reads back differently"
            await self.admin.remove_mapping(self.stranger.entity_key, ["after-fuzz", *written])

        self.call(verify)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    server = NatsServer(
        NatsServerConfig.in_dir(tmp_path_factory.mktemp("fuzz-nats"), server_name="fuzz")
    )
    server.start()
    try:
        with start_blocking_portal(backend="asyncio") as portal:
            env = FuzzEnv(portal, server.url)
            env.start()
            try:
                yield env
            finally:
                env.stop()
                print(f"fuzz cases: {dict(sorted(env.counts.items()))}, total {env.counts.total()}")
    finally:
        server.stop()


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def check_all(fuzz: FuzzEnv, cases: st.SearchStrategy[Case], examples: int) -> None:
    """Send every case drawn from `cases`, then check that what was stored is intact."""

    @fuzz_settings(examples)
    @given(case=cases)
    def run(case: Case) -> None:
        fuzz.check(case)

    run()
    fuzz.assert_intact()


# --- strategies: pieces -------------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
SUBJECT_TOKENS = st.text(
    st.one_of(_PRINTABLE.filter(lambda c: c not in ".*>"), st.sampled_from("éß中ж")),
    min_size=1,
    max_size=24,
)
HEADER_NAMES = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=30)
KV_NAME_CHARS = string.ascii_letters + string.digits + "-_=/"
FUZZ_NAMES = st.text(KV_NAME_CHARS, min_size=1, max_size=40).map(lambda s: f"fz-{s}")
MISSING_NAMES = st.text(KV_NAME_CHARS, min_size=1, max_size=40).map(lambda s: f"nx-{s}")
BAD_NAMES = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a b",
            "a*",
            "a>",
            "ä",
            "_secrets-nats-kv_x",
            "x" * 256,
            "a\nb",
            "a\x00b",
        ]
    ),
    st.text(min_size=1, max_size=30).filter(lambda s: any(c not in KV_NAME_CHARS + "." for c in s)),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JUNK_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    _containers,  # a def, not a lambda: hypothesis reads its source to see it recurses
    max_leaves=12,
)
NOT_STRINGS = st.one_of(
    st.integers(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
BIG_TEXT = st.sampled_from([0, 1, 1000, 70_000, 300_000]).map(lambda n: "z" * n)


def other_role_keys(*but: Role) -> list[str]:
    """Valid nkeys and seeds of every role except `but`: where those are expected, refused."""
    keys = [encode_public(role, os.urandom(32)) for role in Role if role not in but]
    keys.append(XKey.generate().seed)
    keys.append(encode_seed(Role.ACCOUNT, os.urandom(32)))
    return keys


ENTITY_ROLES = (Role.MODULE, Role.SERVICE)  # what a mapping's entity may be


def mangled(text: str) -> st.SearchStrategy[str]:
    """`text` with one character changed, dropped or added, cut, or in other case."""
    return st.one_of(
        st.tuples(
            st.integers(0, len(text) - 1), st.sampled_from(string.ascii_uppercase + "234567")
        ).map(lambda p: text[: p[0]] + p[1] + text[p[0] + 1 :]),
        st.integers(0, len(text) - 1).map(lambda i: text[:i] + text[i + 1 :]),
        st.just(text + "A"),
        st.just(text.lower()),
        st.integers(0, len(text) - 1).map(lambda i: text[:i]),
    )


def xkey_headers(valid: list[str]) -> st.SearchStrategy[dict[str, str] | None]:
    """Header maps: none, empty, without the key, or the key holding anything at all."""
    values = st.one_of(
        st.sampled_from(valid),
        st.sampled_from(other_role_keys(Role.CURVE)),
        st.sampled_from(valid).flatmap(mangled),
        st.text(_PRINTABLE, max_size=80),
        st.sampled_from([1000, 60_000]).map(lambda n: "X" * n),
    ).map(str.strip)
    extra = st.dictionaries(HEADER_NAMES, st.text(_PRINTABLE, max_size=40), max_size=3)
    return st.one_of(
        st.none(),
        st.just({}),
        extra.filter(lambda h: HOST_XKEY_HEADER not in h),
        st.builds(lambda v, more: {**more, HOST_XKEY_HEADER: v}, values, extra),
        st.builds(lambda v: {HOST_XKEY_HEADER.lower(): v}, st.sampled_from(valid)),
    )


def is_xkey(text: str | None) -> bool:
    if not text:
        return False
    try:
        XKey.from_public(text)
    except InvalidKey:
        return False
    return True


# --- layer 1: subjects, headers, payloads ---------------------------------------------------


@dataclass(frozen=True)
class Envelope(ShortRepr):
    operation: str
    argument: str | None
    extra: tuple[str, ...]
    headers: dict[str, str] | None
    payload: bytes

    def __repr__(self) -> str:
        return (
            f"Envelope({short(self.operation)}, {short(self.argument)}, {short(self.extra)}, "
            f"headers={short(self.headers)}, payload={short(self.payload)})"
        )


def envelope_expectation(env: FuzzEnv, subject_rest: str, e: Envelope) -> str | None:
    """The reply the protocol fixes for a request whose payload does not open."""
    operation, _, argument = subject_rest.partition(".")
    if operation not in OPS:
        return "unknown"
    if operation == "server_xkey":
        return "xkey"
    if operation in ("add_mapping", "remove_mapping"):
        if not argument:
            return "invalid subject"
        if not _entity_ok(argument):
            return "InvalidRequest"
    if not e.payload:
        return "InvalidPayload"
    if not e.headers:
        return "InvalidHeaders"
    sender = e.headers.get(HOST_XKEY_HEADER)
    if not is_xkey(sender):
        return "InvalidXKey"
    if operation != "get" and sender not in env.config.admin_public_keys:
        return "Unauthorized"
    return "DecryptionError"


def _entity_ok(text: str) -> bool:
    try:
        validate_entity(text)
    except InvalidKey:
        return False
    return True


def envelopes(env: FuzzEnv) -> st.SearchStrategy[Envelope]:
    transit = env.keys.transit.public_key
    senders = [transit, XKey.generate().public_key]
    entity = SigningKey.generate(Role.MODULE).public_key
    payloads = st.one_of(
        st.just(b""),
        st.binary(max_size=300),
        st.binary(max_size=64).map(lambda b: b"xkv1" + b),
        st.tuples(st.binary(min_size=1, max_size=8), st.sampled_from([100_000, 700_000])).map(
            lambda p: (p[0] * (p[1] // len(p[0]) + 1))[: p[1]]
        ),
        # Sealed properly, but to a key that is not the transit key: must not open.
        st.binary(max_size=100).map(lambda b: XKey.generate().seal(b, XKey.generate())),
    )
    return st.builds(
        Envelope,
        operation=st.one_of(st.sampled_from(OPS), SUBJECT_TOKENS),
        argument=st.one_of(
            st.none(), st.just(entity), SUBJECT_TOKENS, st.sampled_from(other_role_keys())
        ),
        extra=st.lists(SUBJECT_TOKENS, max_size=2).map(tuple),
        headers=xkey_headers(senders),
        payload=payloads,
    )


def test_subjects_headers_and_payloads(fuzz: FuzzEnv) -> None:
    @fuzz_settings(800)
    @given(e=envelopes(fuzz))
    def run(e: Envelope) -> None:
        rest = ".".join([e.operation, *([e.argument] if e.argument is not None else []), *e.extra])
        expected = envelope_expectation(fuzz, rest, e)
        fuzz.check(Case("envelope", rest, e.payload, e.headers, expected))

    run()
    fuzz.assert_intact()


# --- layer 2: get bodies sealed to the transit key ----------------------------------------


def set_path(doc: Doc, path: tuple[str, ...], value: object) -> Doc:
    copy: Doc = json.loads(json.dumps(doc))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def drop_path(doc: Doc, path: tuple[str, ...]) -> Doc:
    copy: Doc = json.loads(json.dumps(doc))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


REQUIRED_GET = [("key",), ("context",), ("context", "entity_jwt"), ("context", "host_jwt")]
OPTIONAL_GET = [("field",), ("version",), ("context", "application", "name")]
STRINGS_GET = [*REQUIRED_GET[2:], ("key",), ("context", "application", "policy")]
OBJECTS_GET = [("context",), ("context", "application")]


@dataclass(frozen=True)
class GetBody(ShortRepr):
    doc: object  # the JSON value sealed (not always an object)
    who: str  # whose tokens: "reader" (mapped to the canaries) or "stranger"
    expected: str | None  # None: work it out from the document's key, version

    def __repr__(self) -> str:
        return f"GetBody({short(self.doc)}, {self.who!r}, {self.expected!r})"


@st.composite
def get_bodies(draw: st.DrawFn, env: FuzzEnv) -> GetBody:
    who = draw(st.sampled_from(["reader", "reader", "stranger"]))
    entity_jwt, host_jwt = env.tokens[who]
    key = draw(st.one_of(st.sampled_from([CANARY_STRING, CANARY_BINARY]), FUZZ_NAMES, BIG_TEXT))
    version = draw(
        st.one_of(
            st.none(),
            st.text(max_size=25),
            st.sampled_from([str(r) for r, _ in env.canaries.values()]),
        )
    )
    doc: Doc = {
        "key": key,
        "field": draw(st.one_of(st.none(), st.text(max_size=10))),
        "version": version,
        "context": {
            "entity_jwt": entity_jwt,
            "host_jwt": host_jwt,
            "application": {"name": draw(st.one_of(st.none(), BIG_TEXT)), "policy": ""},
        },
    }
    mutation = draw(
        st.sampled_from(
            ["none", "drop", "drop optional", "type", "object type", "extra", "not an object"]
        )
    )
    if mutation == "drop":
        return GetBody(drop_path(doc, draw(st.sampled_from(REQUIRED_GET))), who, "InvalidRequest")
    if mutation == "drop optional":
        doc = drop_path(doc, draw(st.sampled_from(OPTIONAL_GET)))
    elif mutation == "type":
        path = draw(st.sampled_from(STRINGS_GET + OPTIONAL_GET))
        return GetBody(set_path(doc, path, draw(NOT_STRINGS)), who, "InvalidRequest")
    elif mutation == "object type":
        path = draw(st.sampled_from(OBJECTS_GET))
        junk = draw(
            st.one_of(st.none(), st.text(max_size=5), st.integers(), st.lists(st.integers()))
        )
        return GetBody(set_path(doc, path, junk), who, "InvalidRequest")
    elif mutation == "extra":
        path = draw(st.sampled_from([(), ("context",), ("context", "application")]))
        name = draw(
            st.text(max_size=10).filter(
                lambda k: k not in doc and k not in doc["context"] and k not in ("name", "policy")
            )
        )
        doc = (
            set_path(doc, (*path, name), draw(JUNK_JSON))
            if path
            else {**doc, name: draw(JUNK_JSON)}
        )
    elif mutation == "not an object":
        return GetBody(
            draw(st.one_of(st.lists(JUNK_JSON, max_size=3), st.text(), st.integers(), st.none())),
            who,
            "InvalidRequest",
        )
    return GetBody(doc, who, None)


def get_case(env: FuzzEnv, body: GetBody, raw: bytes | None = None) -> Case:
    """Seal `body` to the transit key from a fresh host key, predicting the reply."""
    host_key = XKey.generate()
    data = raw if raw is not None else json.dumps(body.doc).encode()
    case = Case(
        "get body",
        "get",
        host_key.seal(data, env.keys.transit),
        {HOST_XKEY_HEADER: host_key.public_key},
        body.expected,
        host_key,
    )
    if body.expected is None and isinstance(body.doc, dict):
        case.expected, case.secret = predict_get(env, body.who, body.doc)
    return case


def predict_get(env: FuzzEnv, who: str, doc: Doc) -> tuple[str, tuple[str, str, bytes] | None]:
    key = doc["key"]
    if who != "reader" or key not in env.canaries:
        return "Unauthorized", None
    try:
        wanted = parse_u64(doc.get("version"))
    except Refusal as refusal:
        return refusal.variant, None
    revision, value = env.canaries[key]
    if wanted is not None and wanted != revision:
        return "SecretNotFound", None
    kind = "string" if isinstance(value, str) else "binary"
    return "secret", (str(revision), kind, value.encode() if isinstance(value, str) else value)


def test_get_bodies(fuzz: FuzzEnv) -> None:
    @fuzz_settings(600)
    @given(body=get_bodies(fuzz))
    def run(body: GetBody) -> None:
        fuzz.check(get_case(fuzz, body))

    run()
    fuzz.assert_intact()


def test_get_bodies_that_are_not_json(fuzz: FuzzEnv) -> None:
    @fuzz_settings(150)
    @given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
    def run(raw: bytes) -> None:
        try:
            json.loads(raw)
        except ValueError:
            expected: str | None = "InvalidRequest"
        else:
            expected = None  # valid JSON: the structured fuzz covers what it means
        fuzz.check(get_case(fuzz, GetBody(None, "reader", expected), raw=raw))

    run()
    fuzz.assert_intact()


# --- layer 3: JWTs with mutated segments --------------------------------------------------


@st.composite
def mutated_tokens(draw: st.DrawFn, token: str, other: str) -> str:
    """`token` changed in one segment (or in its structure); maybe left as it is."""
    segments = token.split(".")
    alphabet = string.ascii_letters + string.digits + "-_"
    i = draw(st.integers(0, 2))
    seg = segments[i]
    how = draw(
        st.sampled_from(
            [
                "flip",
                "drop char",
                "add char",
                "truncate",
                "pad",
                "swap in",
                "swap segments",
                "add segment",
                "drop segment",
                "empty",
                "huge",
                "non-ascii",
                "same",
            ]
        )
    )
    if how == "flip":
        at = draw(st.integers(0, len(seg) - 1))
        seg = seg[:at] + draw(st.sampled_from(alphabet + "+/=.")) + seg[at + 1 :]
    elif how == "drop char":
        at = draw(st.integers(0, len(seg) - 1))
        seg = seg[:at] + seg[at + 1 :]
    elif how == "add char":
        at = draw(st.integers(0, len(seg)))
        seg = seg[:at] + draw(st.sampled_from(alphabet)) + seg[at:]
    elif how == "truncate":
        seg = seg[: draw(st.integers(0, len(seg) - 1))]
    elif how == "pad":
        seg += "=" * draw(st.integers(1, 3))
    elif how == "swap in":
        seg = other.split(".")[i]
    elif how == "swap segments":
        j = draw(st.integers(0, 2))
        segments[i], segments[j] = segments[j], segments[i]
        return ".".join(segments)
    elif how == "add segment":
        return token + "." + draw(st.text(alphabet, max_size=20))
    elif how == "drop segment":
        return ".".join(segments[:i] + segments[i + 1 :])
    elif how == "empty":
        seg = ""
    elif how == "huge":
        seg += "A" * 70_000
    elif how == "non-ascii":
        seg = seg[:3] + "é" + seg[3:]
    segments[i] = seg
    return ".".join(segments)


def test_mutated_jwts(fuzz: FuzzEnv) -> None:
    entity_jwt, host_jwt = fuzz.tokens["reader"]
    other_entity, other_host = fuzz.tokens["stranger"]  # whose segments get swapped in
    revision, value = fuzz.canaries[CANARY_STRING]
    assert isinstance(value, str)
    secret = (str(revision), "string", value.encode())

    @fuzz_settings(400)
    @given(
        target=st.sampled_from(["entity", "host"]),
        data=st.data(),
    )
    def run(target: str, data: st.DataObject) -> None:
        original, other = (
            (entity_jwt, other_entity) if target == "entity" else (host_jwt, other_host)
        )
        token = data.draw(mutated_tokens(original, other), label="token")
        context = {"entity_jwt": entity_jwt, "host_jwt": host_jwt, f"{target}_jwt": token}
        doc: Doc = {"key": CANARY_STRING, "context": context}
        refusal = "InvalidEntityJWT" if target == "entity" else "InvalidHostJWT"
        # Any change refuses the token, `=` padding included (PROTOCOL §4: unpadded).
        expected = "secret" if token == original else refusal
        case = get_case(fuzz, GetBody(doc, "reader", expected))
        case.kind = f"{target} jwt"
        case.secret = secret
        fuzz.check(case)

    run()
    fuzz.assert_intact()


# --- layer 4: admin bodies sealed by the admin key -------------------------------------------


def admin_case(
    env: FuzzEnv,
    kind: str,
    operation: str,
    doc: object,
    expected: str | None,
    how: str = "",
) -> Case:
    """`doc` sealed to the transit key by an admin key; by a stranger's key (which must be
    refused as `Unauthorized`) when `how` is "not admin"."""
    stranger = how == "not admin"
    key = XKey.generate() if stranger else env.keys.transit
    return Case(
        kind,
        operation,
        key.seal(bind_request(operation, json.dumps(doc).encode()), env.keys.transit),
        {HOST_XKEY_HEADER: key.public_key},
        "Unauthorized" if stranger else expected,
        note=how,
    )


def now() -> int:
    return int(time.time())


STAMP_MUTATIONS = st.sampled_from(
    [
        "drop request_id",
        "empty request_id",
        "int request_id",
        "drop issued_at",
        "negative issued_at",
        "text issued_at",
        "float issued_at",
        "old",
        "future",
    ]
)


def stamp_mutation(draw: st.DrawFn, doc: Doc, how: str) -> tuple[Doc, str]:
    """Break the replay protection fields one way; the error that must follow."""
    if how.startswith("drop"):
        return drop_path(doc, (how.split()[1],)), "InvalidRequest"
    if how == "empty request_id":
        return {**doc, "request_id": ""}, "InvalidRequest"
    if how == "int request_id":
        return {**doc, "request_id": draw(st.integers())}, "InvalidRequest"
    if how == "negative issued_at":
        return {**doc, "issued_at": draw(st.integers(max_value=-1))}, "InvalidRequest"
    if how == "text issued_at":
        return {**doc, "issued_at": str(now())}, "InvalidRequest"
    if how == "float issued_at":
        return {**doc, "issued_at": now() + 0.5}, "InvalidRequest"
    skew = draw(st.integers(SKEW_LIMIT + 5, 10**9))
    return {**doc, "issued_at": now() - skew if how == "old" else now() + skew}, "Unauthorized"


@st.composite
def put_cases(draw: st.DrawFn, env: FuzzEnv) -> Case:
    name = draw(FUZZ_NAMES)
    binary = draw(st.booleans())
    # Marked with random bytes: a value must not also be public text (a name, a JSON key).
    raw = os.urandom(16) + draw(st.one_of(st.binary(max_size=48), st.just(os.urandom(40_000))))
    value: str | bytes = raw if binary else raw.hex() + draw(st.text(max_size=20))
    remember(value, "fuzz value")
    plain = value if isinstance(value, bytes) else value.encode()
    doc: Doc = {
        "key": name,
        "version": "",
        "string_secret": None,
        "binary_secret": None,
        "request_id": uuid.uuid4().hex,
        "issued_at": now(),
    }
    doc["binary_secret" if binary else "string_secret"] = list(plain) if binary else value
    how = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "drop version",
                "extra",
                "stamp",
                "drop key",
                "bad name",
                "type",
                "byte range",
                "both",
                "neither",
                "not admin",
                "original form",
            ]
        )
    )
    expected = "ok"
    if how == "drop version":
        doc = drop_path(doc, ("version",))
    elif how == "extra":
        doc = {**doc, "zz_extra": draw(JUNK_JSON)}
    elif how == "stamp":
        doc, expected = stamp_mutation(draw, doc, draw(STAMP_MUTATIONS))
    elif how == "drop key":
        doc, expected = drop_path(doc, ("key",)), "InvalidRequest"
    elif how == "bad name":
        doc, expected = {**doc, "key": draw(BAD_NAMES)}, "InvalidRequest"
    elif how == "type":
        path = draw(st.sampled_from(["key", "version", "string_secret", "binary_secret"]))
        doc, expected = (
            {
                **doc,
                path: draw(
                    st.one_of(
                        st.integers(), st.booleans(), st.text(max_size=3).map(lambda t: {t: 1})
                    )
                ),
            },
            "InvalidRequest",
        )
    elif how == "byte range":
        bad = draw(
            st.one_of(
                st.integers(max_value=-1),
                st.integers(min_value=256),
                st.floats(),
                st.text(max_size=2),
            )
        )
        doc, expected = (
            {**doc, "string_secret": None, "binary_secret": [*list(plain[:4]), bad]},
            "InvalidRequest",
        )
    elif how == "both":
        doc, expected = {**doc, "string_secret": "s", "binary_secret": [1]}, "NoSecretProvided"
    elif how == "neither":
        doc, expected = {**doc, "string_secret": None, "binary_secret": None}, "NoSecretProvided"
    elif how == "original form":  # the unauthenticated body, refused unless --insecure-...
        doc, expected = (
            {k: v for k, v in doc.items() if k not in ("request_id", "issued_at")},
            "InvalidRequest",
        )
    case = admin_case(env, "put body", "put_secret", doc, expected, how)
    if case.expected == "ok":
        case.written = (name, plain)
        case.send_twice = draw(st.booleans())
    return case


def test_put_bodies(fuzz: FuzzEnv) -> None:
    check_all(fuzz, put_cases(fuzz), examples=500)


@pytest.mark.parametrize("size", [700_000, 900_000])
def test_put_near_the_payload_limit(fuzz: FuzzEnv, size: int) -> None:
    """A value that fits a request but, sealed and base64-encoded, maybe not an event.

    Stored and readable, or refused with a well-formed error and nothing half-written.
    """
    name, value = f"fz-large-{size}", os.urandom(16).hex() + "z" * size
    remember(value, "large value")
    doc = {"key": name, "version": "", "string_secret": value, "binary_secret": None,
           "request_id": uuid.uuid4().hex, "issued_at": now()}  # fmt: skip
    case = admin_case(fuzz, "large put", "put_secret", doc, None)
    case.written = (name, value.encode())
    fuzz.check(case)
    fuzz.assert_intact()


@st.composite
def mapping_cases(draw: st.DrawFn, env: FuzzEnv) -> Case:
    operation = draw(st.sampled_from(["add_mapping", "remove_mapping"]))
    role = draw(st.sampled_from([Role.MODULE, Role.SERVICE]))
    entity = SigningKey.generate(role).public_key
    doc: Doc = {
        "secrets": draw(st.lists(FUZZ_NAMES, min_size=1, max_size=3)),
        "request_id": uuid.uuid4().hex,
        "issued_at": now(),
    }
    how = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "extra",
                "stamp",
                "empty",
                "bad name",
                "type",
                "bare list",
                "bad entity",
                "extra token",
                "not admin",
            ]
        )
    )
    expected = "ok"
    if how == "extra":
        doc = {**doc, "zz": draw(JUNK_JSON)}
    elif how == "stamp":
        doc, expected = stamp_mutation(draw, doc, draw(STAMP_MUTATIONS))
    elif how == "empty":
        doc, expected = {**doc, "secrets": []}, "InvalidRequest"
    elif how == "bad name":
        doc, expected = {**doc, "secrets": [*doc["secrets"], draw(BAD_NAMES)]}, "InvalidRequest"
    elif how == "type":
        junk = draw(
            st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), min_size=1))
        )
        doc, expected = {**doc, "secrets": junk}, "InvalidRequest"
    elif how == "bare list":  # the original's body: refused without --insecure-...
        doc, expected = doc["secrets"], "InvalidRequest"
    elif how == "bad entity":
        entity = draw(st.one_of(SUBJECT_TOKENS, st.sampled_from(other_role_keys(*ENTITY_ROLES))))
        expected = "InvalidRequest"
    elif how == "extra token":
        entity += "." + draw(SUBJECT_TOKENS)
        expected = "InvalidRequest"
    return admin_case(env, "mapping body", f"{operation}.{entity}", doc, expected, how)


def test_mapping_bodies(fuzz: FuzzEnv) -> None:
    check_all(fuzz, mapping_cases(fuzz), examples=300)


@st.composite
def lifecycle_cases(draw: st.DrawFn, env: FuzzEnv) -> Case:
    operation = draw(st.sampled_from(LIFECYCLE_OPS))
    doc: Doc = {"request_id": uuid.uuid4().hex, "issued_at": now()}
    expected = "ok"
    if operation == "mappings" and draw(st.booleans()):
        doc["entity"] = SigningKey.generate(Role.MODULE).public_key
    if operation in ("delete", "undelete", "destroy"):
        doc["name"] = draw(MISSING_NAMES)  # never stored: every valid change is SecretNotFound
        expected = "SecretNotFound"
        if operation == "destroy":
            if draw(st.booleans()):
                doc["all"] = True
            else:
                doc["version"] = draw(st.integers(0, 2**63 - 1))
    how = draw(
        st.sampled_from(
            [
                "none",
                "none",
                "extra",
                "stamp",
                "bad name",
                "name type",
                "no name",
                "version",
                "all",
                "both",
                "neither",
                "entity",
                "not admin",
                "not an object",
            ]
        )
    )
    changes = operation in ("delete", "undelete", "destroy")
    if how == "extra":
        doc = {**doc, "zz": draw(JUNK_JSON)}
    elif how == "stamp":
        doc, expected = stamp_mutation(draw, doc, draw(STAMP_MUTATIONS))
    elif how == "bad name" and changes:
        doc, expected = {**doc, "name": draw(BAD_NAMES)}, "InvalidRequest"
    elif how == "name type":
        doc, expected = {**doc, "name": draw(NOT_STRINGS)}, "InvalidRequest"
    elif how == "no name" and changes:
        doc, expected = drop_path(doc, ("name",)), "InvalidRequest"
    elif how == "version":
        bad = draw(
            st.one_of(
                st.integers(max_value=-1),
                st.integers(min_value=2**63),
                st.text(max_size=3),
                st.floats(allow_nan=False),
            )
        )
        doc, expected = {**doc, "version": bad}, "InvalidRequest"
    elif how == "all":
        doc, expected = (
            {**doc, "all": draw(st.one_of(st.integers(), st.text(max_size=3), st.none()))},
            "InvalidRequest",
        )
    elif how in ("both", "neither") and operation == "destroy":
        doc = {k: v for k, v in doc.items() if k not in ("version", "all")}
        if how == "both":
            doc.update(version=1, all=True)
        expected = "InvalidRequest"
    elif how == "entity":
        junk = draw(
            st.one_of(SUBJECT_TOKENS, st.sampled_from(other_role_keys(*ENTITY_ROLES)), NOT_STRINGS)
        )
        doc = {**doc, "entity": junk}
        if operation == "mappings" or not isinstance(junk, str):
            expected = "InvalidRequest"
    elif how == "not an object":
        doc, expected = (
            draw(st.one_of(st.lists(JUNK_JSON, max_size=2), st.text(max_size=5))),
            "InvalidRequest",
        )
    return admin_case(env, f"{operation} body", operation, doc, expected, how)


def test_lifecycle_bodies(fuzz: FuzzEnv) -> None:
    check_all(fuzz, lifecycle_cases(fuzz), examples=500)


# --- the end-of-run leak check (tests/leakcheck.py) can fail --------------------------------


def test_leak_scan_finds_planted_plaintexts(tmp_path: Path) -> None:
    """Planted in the forms a careless write gives a value, at odd offsets: all found."""
    registry = Registry()  # not the session's: these plants are meant to be found
    text, blob = f"planted {uuid.uuid4()} ✓", os.urandom(40)
    registry.remember(text, "string")
    registry.remember(blob, "binary")
    registry.remember("tiny", "short")  # too short to search: ignored, not a false alarm
    registry.remember(b"\x00" * 64, "zeros")  # one distinct byte: ignored likewise
    registry.remember("request_id", "word")  # a field name every event has: ignored likewise
    store = tmp_path / "store" / "jetstream" / "streams"
    store.mkdir(parents=True)
    plants = {
        store / "raw.blk": os.urandom(1001) + text.encode() + os.urandom(7),
        store / "events.json": b'{"sealed":"' + base64.b64encode(b"xk" + blob) + b'"}',
        store / "hex.log": b"value=" + blob.hex().encode(),
        store / "array.json": b'{"binary_secret":[' + ",".join(map(str, blob)).encode() + b"]}",
        store / "escaped.json": json.dumps({"v": text}).encode(),  # ✓ as \\u2713
    }
    for path, data in plants.items():
        path.write_bytes(data)
    (tmp_path / "clean.blk").write_bytes(os.urandom(4096) + b"\x00" * 128 + b'"request_id"')
    exempted = tmp_path / "cli-input.bin"
    exempted.write_bytes(blob)
    registry.exempt(exempted)
    (tmp_path / "link").symlink_to(store / "raw.blk")  # not followed: found once, not twice

    report = registry.scan(tmp_path)

    assert sorted(hit.path for hit in report.hits) == sorted(plants)
    assert report.files == len(plants) + 1
    assert (registry.remembered, registry.protocol_words) == (2, 1)
    for hit in report.hits:
        assert text not in str(hit), "a leak report must not repeat the secret"
        assert blob.hex() not in str(hit)


@settings(max_examples=200 * SCALE, deadline=None)
@given(
    prefix=st.binary(max_size=40),
    value=st.binary(min_size=MIN_LENGTH, max_size=40).filter(searchable),
    suffix=st.binary(max_size=40),
)
def test_leak_index_finds_a_needle_at_any_offset(
    prefix: bytes, value: bytes, suffix: bytes
) -> None:
    """The aligned-word shortcut misses nothing: every offset, every length from 8 on."""
    index = NeedleIndex([Needle(value, "v")])
    data = prefix + value + suffix
    assert [offset for offset, _ in index.occurrences(data)] == [data.find(value)]


def test_leak_check_fails_the_session(tmp_path: Path) -> None:
    """End to end: a run whose test writes a remembered value to disk exits 1 and says where."""
    secret = f"leaky-{uuid.uuid4().hex}"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(
        "from support.leakcheck import remember\n"
        "def test_writes(tmp_path, leak_registry):\n"
        f"    remember({secret!r})\n"
        "    assert leak_registry.needles\n"
        f"    (tmp_path / 'store.blk').write_bytes(b'junk' + {secret!r}.encode())\n"
        "def test_keeps(tmp_path):\n"
        f"    remember({secret[::-1]!r})\n"
        "    (tmp_path / 'other.blk').write_text('nothing to see')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def inner(*select: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "support.leakcheck", "-p", "no:cacheprovider",
             "-c", str(tmp_path / "pytest.ini"), "--basetemp", str(tmp_path / "base"),
             "-q", str(tmp_path / "test_inner.py"), *select],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip

    leaky = inner()
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "2 passed" in leaky.stdout
    assert "LEAK:" in leaky.stdout
    assert "store.blk" in leaky.stdout
    assert secret not in leaky.stdout + leaky.stderr
    clean = inner("-k", "keeps")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "leak check: 1 remembered values" in clean.stdout
    assert "LEAK:" not in clean.stdout
