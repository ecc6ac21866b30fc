"""The protocol fuzz's harness: cases, the meaning of replies, the backend under fuzz, and
the strategy pieces every layer draws from (tests/nats/test_fuzz_*.py, one file a layer).
"""

from __future__ import annotations

import functools
import json
import os
import string
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import nats.errors
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from actors.backend import Backend
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.errors import TEXT_VARIANTS, UNIT_VARIANTS, InvalidKey
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, encode_public, encode_seed
from secrets_nats_kv.wire import HOST_XKEY_HEADER, RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, backend_config
from support.host import HostClient
from support.leakcheck import remember

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


def fuzz_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    """A fuzz environment on a server of its own (a test module's fixture yields from it)."""
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
