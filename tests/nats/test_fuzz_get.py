"""Protocol fuzz, layers 2 and 3: `get` bodies sealed to the transit key, and JWTs with
mutated segments (see support/fuzz.py for the harness).

Each case knows its reply: the exact error where PROTOCOL.md §3 fixes it, else a
well-formed one; the canaries read back unchanged afterwards.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.fuzz import (
    BIG_TEXT,
    CANARY_BINARY,
    CANARY_STRING,
    FUZZ_NAMES,
    JUNK_JSON,
    NOT_STRINGS,
    REQUIRED_GET,
    Case,
    Doc,
    FuzzEnv,
    ShortRepr,
    drop_path,
    fuzz_environment,
    fuzz_settings,
    set_path,
    short,
)
from support.model import Refusal, parse_u64


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    yield from fuzz_environment(tmp_path_factory)


# --- layer 2: get bodies sealed to the transit key ----------------------------------------


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
