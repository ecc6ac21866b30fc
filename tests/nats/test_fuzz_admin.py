"""Protocol fuzz, layer 4: admin bodies sealed by the admin key (see support/fuzz.py).

Puts, mapping changes and lifecycle operations, sealed correctly but wrong inside (missing
fields, wrong types, huge and empty values, skewed clocks, bad names): the exact error
where PROTOCOL.md §5 fixes it; every acknowledged put reads back at its revision.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import strategies as st

from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.fuzz import (
    BAD_NAMES,
    ENTITY_ROLES,
    FUZZ_NAMES,
    JUNK_JSON,
    LIFECYCLE_OPS,
    MISSING_NAMES,
    NOT_STRINGS,
    SKEW_LIMIT,
    SUBJECT_TOKENS,
    Case,
    Doc,
    FuzzEnv,
    check_all,
    drop_path,
    fuzz_environment,
    other_role_keys,
)
from support.harness import bind_request
from support.leakcheck import remember


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    yield from fuzz_environment(tmp_path_factory)


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
