"""The wire types against the shared interop vectors and PROTOCOL.md §3/§5, byte for byte.

The vectors were made outside this project, so a round trip that reproduces them shows
our field order, null handling and error tagging match the original's JSON exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secrets_nats_kv import errors, wire
from secrets_nats_kv.wire import (
    AdminPutSecretRequest,
    AdminRequest,
    Application,
    Context,
    MappingRequest,
    PutSecretRequest,
    PutSecretResponse,
    Secret,
    SecretRequest,
)
from support.vectors import load_vectors

U64_MAX = 2**64 - 1
UINT_MAX = 2**63 - 1  # what wire.UInt accepts

# PROTOCOL.md §3, restated here rather than read from errors.py so a drift in either shows.
UNIT_VARIANTS = [
    "SecretNotFound",
    "InvalidXKey",
    "EncryptionError",
    "DecryptionError",
    "Unauthorized",
    "InvalidRequest",
    "InvalidPayload",
    "InvalidHeaders",
]
TEXT_VARIANTS = ["InvalidEntityJWT", "InvalidHostJWT", "UpstreamError", "PolicyError", "Other"]
# PROTOCOL.md §5: the error strings of a put_secret reply.
PUT_ERRORS = [
    "InvalidPayload",
    "InvalidHeaders",
    "InvalidXKey",
    "DecryptionError",
    "NoSecretProvided",
    "RotationInProgress",
]


def compact(value: Any) -> bytes:
    """The JSON the original (serde_json) sends: no spaces, UTF-8, keys in given order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# --- the shared vectors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    """The `wire` section of the interop vectors (skips when the file is absent)."""
    section: dict[str, Any] = load_vectors()["wire"]
    return section


def _rt_secret_response(data: bytes) -> bytes:
    try:
        secret = wire.decode_secret_response(data)
    except errors.ProtocolError as err:
        return wire.encode_error_response(err)
    return wire.encode_secret_response(secret)


def _rt_put_response(data: bytes) -> bytes:
    response = wire.decode_put_response(data)
    err = None if response.error is None else wire.put_error_from_wire(response.error)
    return wire.encode_put_response(response.revision, err)


# Vector name -> decode-then-encode through the public API.
ROUND_TRIPS: dict[str, Callable[[bytes], bytes]] = {
    "secret_request": lambda d: wire.encode_secret_request(wire.decode_secret_request(d)),
    "secret_response_string": _rt_secret_response,
    "secret_response_binary": _rt_secret_response,
    "secret_response_unit_error": _rt_secret_response,
    "secret_response_error_with_text": _rt_secret_response,
    "put_secret_request_string": lambda d: wire.encode_put_request(
        wire.decode_put_request(d, authenticated=False)
    ),
    "put_secret_request_binary": lambda d: wire.encode_put_request(
        wire.decode_put_request(d, authenticated=False)
    ),
    "put_secret_response_ok": _rt_put_response,
    "put_secret_response_error": _rt_put_response,
    "add_mapping_payload": lambda d: wire.encode_mapping_request(
        wire.decode_mapping_request(d, authenticated=False)
    ),
}


def test_every_wire_vector_has_a_round_trip(vectors: dict[str, Any]) -> None:
    assert set(vectors) == set(ROUND_TRIPS)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_vector_round_trips_byte_for_byte(vectors: dict[str, Any], name: str) -> None:
    data = compact(vectors[name])
    assert ROUND_TRIPS[name](data) == data


def test_secret_request_vector_decodes_to_its_fields(vectors: dict[str, Any]) -> None:
    vec = vectors["secret_request"]
    req = wire.decode_secret_request(compact(vec))
    assert req.key == "secret-foo"
    assert req.field is None
    assert req.version == "2"
    assert req.requested_revision() == 2
    assert req.context.entity_jwt == vec["context"]["entity_jwt"]
    assert req.context.host_jwt == vec["context"]["host_jwt"]
    assert req.context.application == Application(
        "dog-app", vec["context"]["application"]["policy"]
    )


def test_secret_response_vectors_decode_to_their_values(vectors: dict[str, Any]) -> None:
    text = wire.decode_secret_response(compact(vectors["secret_response_string"]))
    assert text == Secret.of_string("2", "sup3rs3cr3t")
    assert text.value_bytes() == b"sup3rs3cr3t"
    binary = wire.decode_secret_response(compact(vectors["secret_response_binary"]))
    assert binary == Secret.of_bytes("3", bytes([0, 255, 1, 254, 128]))
    assert binary.value_bytes() == bytes([0, 255, 1, 254, 128])


def test_error_vectors_raise_their_classes(vectors: dict[str, Any]) -> None:
    with pytest.raises(errors.SecretNotFound):
        wire.decode_secret_response(compact(vectors["secret_response_unit_error"]))
    with pytest.raises(errors.InvalidEntityJWT) as caught:
        wire.decode_secret_response(compact(vectors["secret_response_error_with_text"]))
    assert caught.value.text == "Invalid Component JWT: token expired at `1 hour ago`"


def test_put_vectors_decode_to_their_values(vectors: dict[str, Any]) -> None:
    text = wire.decode_put_request(
        compact(vectors["put_secret_request_string"]), authenticated=False
    )
    assert text == PutSecretRequest("secret-foo", "", "sup3rs3cr3t", None)
    assert text.value_bytes() == b"sup3rs3cr3t"
    binary = wire.decode_put_request(
        compact(vectors["put_secret_request_binary"]), authenticated=False
    )
    assert binary.value_bytes() == bytes([0, 255, 1, 254, 128])
    assert wire.decode_put_response(compact(vectors["put_secret_response_ok"])).result() == 1
    failed = wire.decode_put_response(compact(vectors["put_secret_response_error"]))
    assert failed == PutSecretResponse(0, "DecryptionError")
    with pytest.raises(errors.DecryptionError):
        failed.result()


def test_encoders_produce_the_vectors_from_scratch(vectors: dict[str, Any]) -> None:
    assert wire.encode_secret_response(Secret.of_string("2", "sup3rs3cr3t")) == compact(
        vectors["secret_response_string"]
    )
    assert wire.encode_secret_response(
        Secret.of_bytes("3", bytes([0, 255, 1, 254, 128]))
    ) == compact(vectors["secret_response_binary"])
    assert wire.encode_error_response(errors.SecretNotFound("secret-foo", 2)) == compact(
        vectors["secret_response_unit_error"]
    )
    assert wire.encode_put_request(PutSecretRequest("secret-foo", string_secret="sup3rs3cr3t")) == (
        compact(vectors["put_secret_request_string"])
    )
    assert wire.encode_put_response(1) == compact(vectors["put_secret_response_ok"])
    assert wire.encode_put_response(7, errors.DecryptionError()) == compact(
        vectors["put_secret_response_error"]
    )
    assert wire.encode_mapping_request(["secret-foo", "secret-bin"]) == compact(
        vectors["add_mapping_payload"]
    )


def test_authenticated_put_extends_the_original_body(vectors: dict[str, Any]) -> None:
    for name in ("put_secret_request_string", "put_secret_request_binary"):
        body = {
            **vectors[name],
            "request_id": "req-1",
            "issued_at": 1_795_891_079,
            "operation": "put_secret",
        }
        data = compact(body)
        req = wire.decode_put_request(data, authenticated=True)
        assert type(req) is AdminPutSecretRequest
        assert (req.request_id, req.issued_at) == ("req-1", 1_795_891_079)
        assert wire.encode_put_request(req) == data
        # The original's body has no replay protection, so the admin form refuses it.
        with pytest.raises(errors.InvalidRequest):
            wire.decode_put_request(compact(vectors[name]), authenticated=True)


def test_authenticated_mapping_payload_shape(vectors: dict[str, Any]) -> None:
    names = vectors["add_mapping_payload"]
    entity = "M" + "A" * 55
    data = compact(
        {
            "secrets": names,
            "request_id": "req-2",
            "issued_at": 1_795_891_079,
            "operation": "add_mapping",
            "entity": entity,
        }
    )
    req = wire.decode_mapping_request(data, authenticated=True)
    assert req == MappingRequest(names, "req-2", 1_795_891_079, "add_mapping", entity)
    assert wire.encode_mapping_request(req) == data
    with pytest.raises(errors.InvalidRequest):
        wire.decode_mapping_request(compact(names), authenticated=True)
    with pytest.raises(errors.InvalidRequest):
        wire.decode_mapping_request(data, authenticated=False)


# --- GetSecretError variants (PROTOCOL.md §3) ---------------------------------------------


def test_error_tree_has_exactly_the_protocol_variants() -> None:
    assert sorted(errors.UNIT_VARIANTS) == sorted(UNIT_VARIANTS)
    assert sorted(errors.TEXT_VARIANTS) == sorted(TEXT_VARIANTS)


@pytest.mark.parametrize("variant", UNIT_VARIANTS)
def test_unit_variant_is_a_bare_string(variant: str) -> None:
    cls = errors.UNIT_VARIANTS[variant]
    data = wire.encode_error_response(cls())
    assert data == b'{"error":"' + variant.encode() + b'"}'
    with pytest.raises(errors.ProtocolError) as caught:
        wire.decode_secret_response(data)
    assert type(caught.value) is cls


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_text_variant_is_a_one_key_object(variant: str) -> None:
    cls = errors.TEXT_VARIANTS[variant]
    text = 'bad "token" \u00e9\n'
    data = wire.encode_error_response(cls(text))
    assert data == compact({"error": {variant: text}})
    with pytest.raises(errors.TextProtocolError) as caught:
        wire.decode_secret_response(data)
    assert type(caught.value) is cls
    assert caught.value.text == text


@pytest.mark.parametrize(
    "error_value",
    ["NoSuchVariant", {"NoSuchVariant": "x"}, {"Other": "a", "PolicyError": "b"}, {}],
)
def test_unknown_error_values_still_fail_as_other(error_value: Any) -> None:
    with pytest.raises(errors.Other):
        wire.decode_secret_response(compact({"error": error_value}))


@pytest.mark.parametrize("variant", PUT_ERRORS)
def test_put_error_strings(variant: str) -> None:
    err = wire.put_error_from_wire(variant)
    assert err.variant == variant
    assert type(err).__name__ == variant
    data = wire.encode_put_response(5, err)
    assert data == compact({"revision": 0, "error": variant})
    with pytest.raises(type(err)):
        wire.decode_put_response(data).result()


def test_a_fenced_write_reads_back_as_rotation_in_progress_in_every_reply_form() -> None:
    """A put reply names the variant; a lifecycle or mapping reply carries `{"error": E}`."""
    err = errors.RotationInProgress()
    assert str(err) == "a key rotation is in progress; retry in a few seconds"
    assert isinstance(wire.put_error_from_wire("RotationInProgress"), errors.RotationInProgress)
    body = compact({"error": err.wire()})
    with pytest.raises(errors.RotationInProgress, match="retry in a few seconds"):
        wire.decode_lifecycle_reply(body, wire.ChangeReply)
    assert "RotationInProgress" not in errors.UNIT_VARIANTS  # never a get's answer


# --- SecretResponse edge cases ------------------------------------------------------------


@pytest.mark.parametrize("data", [b"{}", b'{"secret":null}', b'{"secret":null,"error":null}'])
def test_response_with_neither_secret_nor_error_is_rejected(data: bytes) -> None:
    with pytest.raises(errors.InvalidPayload):
        wire.decode_secret_response(data)


def test_response_with_explicit_null_error_is_a_success() -> None:
    secret = {"version": "2", "string_secret": "s", "binary_secret": None}
    assert wire.decode_secret_response(compact({"secret": secret, "error": None})) == (
        Secret.of_string("2", "s")
    )
    assert wire.decode_secret_response(compact({"error": None, "secret": secret})) == (
        Secret.of_string("2", "s")
    )


def test_response_with_both_secret_and_error_fails_with_the_error() -> None:
    secret = {"version": "2", "string_secret": "s", "binary_secret": None}
    with pytest.raises(errors.Unauthorized):
        wire.decode_secret_response(compact({"secret": secret, "error": "Unauthorized"}))


@pytest.mark.parametrize(("string_secret", "binary_secret"), [(None, None), ("s", [1]), ("", [])])
def test_secret_needs_exactly_one_value(string_secret: Any, binary_secret: Any) -> None:
    body = {"version": "1", "string_secret": string_secret, "binary_secret": binary_secret}
    with pytest.raises(errors.InvalidPayload):
        wire.decode_secret_response(compact({"secret": body}))
    with pytest.raises(ValueError, match="exactly one"):
        Secret("1", string_secret, binary_secret)


def test_empty_values_are_values() -> None:
    for secret in (Secret.of_string("1", ""), Secret.of_bytes("1", b"")):
        assert wire.decode_secret_response(wire.encode_secret_response(secret)) == secret
        assert secret.value_bytes() == b""


BAD_BYTES = [-1, 256, 1000, 2**64, 1.5, 1.0, True, "1", None, [1]]


@pytest.mark.parametrize("bad", BAD_BYTES)
def test_binary_values_must_be_bytes(bad: Any) -> None:
    binary = [0, 255, bad]
    response = {"secret": {"version": "1", "string_secret": None, "binary_secret": binary}}
    with pytest.raises(errors.InvalidPayload):
        wire.decode_secret_response(compact(response))
    put = {"key": "k", "version": "", "string_secret": None, "binary_secret": binary}
    with pytest.raises(errors.InvalidRequest):
        wire.decode_put_request(compact(put), authenticated=False)


def test_byte_bounds_are_inclusive() -> None:
    response = {"secret": {"version": "1", "string_secret": None, "binary_secret": [0, 255]}}
    assert wire.decode_secret_response(compact(response)).value_bytes() == b"\x00\xff"


# --- request decoders ---------------------------------------------------------------------


def _secret_request_body() -> dict[str, Any]:
    return {
        "key": "k",
        "field": None,
        "version": None,
        "context": {
            "entity_jwt": "e",
            "host_jwt": "h",
            "application": {"name": None, "policy": ""},
        },
    }


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b'"key"',
        b"{",
        b"\xff\xfe{}",
        b"{}",
        b'{"key":"k"}',
        b'{"key":1,"context":{"entity_jwt":"e","host_jwt":"h"}}',
        b'{"key":"k","context":{"entity_jwt":"e"}}',
        b'{"key":"k","version":2,"context":{"entity_jwt":"e","host_jwt":"h"}}',
        b'{"key":"k","context":{"entity_jwt":"e","host_jwt":"h","application":[]}}',
        b'{"key":"k","context":{"entity_jwt":"e","host_jwt":"h"}} trailing',
    ],
)
def test_secret_request_rejects_bad_shapes(data: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        wire.decode_secret_request(data)


def test_secret_request_optional_parts_default() -> None:
    req = wire.decode_secret_request(b'{"key":"k","context":{"entity_jwt":"e","host_jwt":"h"}}')
    assert req == SecretRequest(key="k", context=Context("e", "h"))
    assert req.context.application == Application(None, "")
    # Encoding always writes every key, nulls included, as the original does.
    assert wire.encode_secret_request(req) == compact(_secret_request_body())


@pytest.mark.parametrize(
    ("version", "revision"),
    [
        (None, None),
        ("0", 0),
        ("2", 2),
        ("+2", 2),
        ("0002", 2),
        ("0" * 5000 + "7", 7),
        (str(U64_MAX), U64_MAX),
    ],
)
def test_requested_revision_parses_like_u64(version: str | None, revision: int | None) -> None:
    req = SecretRequest(key="k", version=version, context=Context("e", "h"))
    assert req.requested_revision() == revision


@pytest.mark.parametrize(
    "version",
    ["", "+", "-1", "-0", " 2", "2 ", "1_0", "0x10", "1e3", "2.0", "\u00b2", "\u0663", "++2",
     str(U64_MAX + 1), "9" * 5000],
)  # fmt: skip
def test_requested_revision_rejects_non_u64(version: str) -> None:
    req = SecretRequest(key="k", version=version, context=Context("e", "h"))
    with pytest.raises(errors.InvalidRequest):
        req.requested_revision()


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize(("string_secret", "binary_secret"), [(None, None), ("s", [1]), ("", [])])
def test_put_request_needs_exactly_one_value(
    authenticated: bool, string_secret: Any, binary_secret: Any
) -> None:
    body: dict[str, Any] = {
        "key": "k",
        "version": "",
        "string_secret": string_secret,
        "binary_secret": binary_secret,
    }
    if authenticated:
        body |= {"request_id": "r", "issued_at": 1}
    with pytest.raises(errors.NoSecretProvided):
        wire.decode_put_request(compact(body), authenticated=authenticated)


def test_put_request_omitted_values_are_null() -> None:
    with pytest.raises(errors.NoSecretProvided):
        wire.decode_put_request(b'{"key":"k"}', authenticated=False)
    req = wire.decode_put_request(b'{"key":"k","string_secret":""}', authenticated=False)
    assert req == PutSecretRequest("k", "", "", None)
    assert req.value_bytes() == b""


@pytest.mark.parametrize(
    "extra",
    [
        {"request_id": "", "issued_at": 1},
        {"request_id": "r", "issued_at": -1},
        {"request_id": "r", "issued_at": UINT_MAX + 1},
        {"request_id": "r", "issued_at": 1.5},
        {"request_id": 1, "issued_at": 1},
        {"issued_at": 1},
        {"request_id": "r"},
    ],
)
def test_admin_put_request_rejects_bad_replay_fields(extra: dict[str, Any]) -> None:
    body = {"key": "k", "version": "", "string_secret": "s", "binary_secret": None, **extra}
    with pytest.raises(errors.InvalidRequest):
        wire.decode_put_request(compact(body), authenticated=True)


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"[1]", b'["a",null]', b'"a"', b'{"secrets":["a"]}', b"[[]]"]
)
def test_mapping_list_rejects_bad_shapes(data: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        wire.decode_mapping_request(data, authenticated=False)


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b'["a"]',
        b'{"secrets":["a"],"request_id":"r"}',
        b'{"secrets":["a"],"request_id":"","issued_at":1}',
        b'{"secrets":"a","request_id":"r","issued_at":1}',
        b'{"secrets":["a"],"request_id":"r","issued_at":-5}',
    ],
)
def test_mapping_request_rejects_bad_shapes(data: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        wire.decode_mapping_request(data, authenticated=True)


@pytest.mark.parametrize(
    ("data", "authenticated"),
    [(b"[]", False), (b'{"secrets":[],"request_id":"r","issued_at":1}', True)],
)
def test_empty_mapping_is_rejected(data: bytes, authenticated: bool) -> None:
    with pytest.raises(errors.InvalidRequest, match="no secrets given"):
        wire.decode_mapping_request(data, authenticated=authenticated)


def test_admin_request_leaves_out_unset_fields() -> None:
    req = AdminRequest("r", 10)
    assert wire.encode_admin_request(req) == b'{"request_id":"r","issued_at":10}'
    assert wire.decode_admin_request(b'{"request_id":"r","issued_at":10}') == req
    full = AdminRequest("r", 10, name="n", version=3, all=True, entity="M1")
    data = b'{"request_id":"r","issued_at":10,"name":"n","version":3,"all":true,"entity":"M1"}'
    assert wire.encode_admin_request(full) == data
    assert wire.decode_admin_request(data) == full
    nulls = b'{"request_id":"r","issued_at":10,"name":null,"version":null,"entity":null}'
    assert wire.decode_admin_request(nulls) == req


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{}",
        b'{"request_id":"r"}',
        b'{"request_id":"","issued_at":1}',
        b'{"request_id":"r","issued_at":1,"version":-1}',
        b'{"request_id":"r","issued_at":1,"version":"2"}',
        b'{"request_id":"r","issued_at":1,"all":1}',
        b'{"request_id":"r","issued_at":1,"name":5}',
    ],
)
def test_admin_request_rejects_bad_shapes(data: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        wire.decode_admin_request(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{}", b'{"revision":-1,"error":null}',
     b'{"revision":"1","error":null}', b'{"revision":1,"error":{"Other":"x"}}',
     b'{"revision":9223372036854775808,"error":null}'],
)  # fmt: skip
def test_put_response_rejects_bad_shapes(data: bytes) -> None:
    with pytest.raises(errors.InvalidPayload):
        wire.decode_put_response(data)


def test_put_response_error_defaults_to_null() -> None:
    # Lenient like serde's Option: a missing "error" is no error.
    assert wire.decode_put_response(b'{"revision":4}') == PutSecretResponse(4, None)


# --- size and nesting ---------------------------------------------------------------------


def test_deep_nesting_is_a_protocol_error_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"key":"k","x":' + deep + b',"context":{"entity_jwt":"e","host_jwt":"h"}}'
    with pytest.raises(errors.InvalidRequest):
        wire.decode_secret_request(body)
    with pytest.raises(errors.InvalidPayload):
        wire.decode_secret_response(b'{"x":' + deep + b"}")
    with pytest.raises(errors.InvalidRequest):
        wire.decode_put_request(b'{"key":"k","x":' + deep + b"}", authenticated=False)
    with pytest.raises(errors.InvalidRequest):
        wire.decode_mapping_request(deep, authenticated=False)
    with pytest.raises(errors.InvalidRequest):
        wire.decode_admin_request(b'{"x":' + deep + b"}")


def test_large_values_round_trip() -> None:
    big_text = "x" * (8 << 20)
    big_bytes = bytes(range(256)) * 4096  # 1 MiB, every byte value
    for secret in (Secret.of_string("9", big_text), Secret.of_bytes("9", big_bytes)):
        assert wire.decode_secret_response(wire.encode_secret_response(secret)) == secret
    put = PutSecretRequest("k", binary_secret=list(big_bytes))
    assert wire.decode_put_request(wire.encode_put_request(put), authenticated=False) == put


# --- secrets stay out of reprs ------------------------------------------------------------


def test_reprs_do_not_show_values_or_tokens() -> None:
    shown = [
        repr(Secret.of_string("1", "hunter2-string")),
        repr(Secret.of_bytes("1", b"hunter2-bytes")),
        repr(PutSecretRequest("k", string_secret="hunter2-string")),
        repr(AdminPutSecretRequest("k", binary_secret=[104, 117], request_id="r", issued_at=1)),
        repr(SecretRequest(key="k", context=Context("jwt-entity-token", "jwt-host-token"))),
    ]
    for text in shown:
        for leak in ("hunter2", "jwt-", "104"):
            assert leak not in text
    assert "key='k'" in shown[2]
    assert shown[3].startswith("AdminPutSecretRequest(")


# --- hypothesis: garbage in, project errors out -------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def _accepts(decoded: object) -> bytes:
    """Re-encode what a decoder accepted: whatever we accept we must be able to send."""
    if isinstance(decoded, Secret):
        return wire.encode_secret_response(decoded)
    if isinstance(decoded, SecretRequest):
        return wire.encode_secret_request(decoded)
    if isinstance(decoded, PutSecretRequest):
        return wire.encode_put_request(decoded)
    if isinstance(decoded, PutSecretResponse):
        return wire.encode_put_response(decoded.revision)
    if isinstance(decoded, MappingRequest | list):
        return wire.encode_mapping_request(decoded)
    assert isinstance(decoded, AdminRequest)
    return wire.encode_admin_request(decoded)


# name -> (decoder, the error classes it may raise)
DECODERS: dict[str, tuple[Callable[[bytes], object], tuple[type[Exception], ...]]] = {
    "secret_request": (wire.decode_secret_request, (errors.InvalidRequest,)),
    # a reply may legitimately carry any protocol error
    "secret_response": (wire.decode_secret_response, (errors.ProtocolError,)),
    "put_request": (
        lambda d: wire.decode_put_request(d, authenticated=False),
        (errors.InvalidRequest, errors.NoSecretProvided),
    ),
    "admin_put_request": (
        lambda d: wire.decode_put_request(d, authenticated=True),
        (errors.InvalidRequest, errors.NoSecretProvided),
    ),
    "put_response": (wire.decode_put_response, (errors.InvalidPayload,)),
    "mapping_list": (
        lambda d: wire.decode_mapping_request(d, authenticated=False),
        (errors.InvalidRequest,),
    ),
    "mapping_request": (
        lambda d: wire.decode_mapping_request(d, authenticated=True),
        (errors.InvalidRequest,),
    ),
    "admin_request": (wire.decode_admin_request, (errors.InvalidRequest,)),
}

# A valid body per decoder, for mutation: garbage that is almost right reaches the type
# checks deep inside, where plain random JSON is turned away at the first byte.
VALID_BODIES: dict[str, Any] = {
    "secret_request": _secret_request_body(),
    "secret_response": {"secret": {"version": "1", "string_secret": "s", "binary_secret": None}},
    "put_request": {"key": "k", "version": "", "string_secret": None, "binary_secret": [1, 2]},
    "admin_put_request": {
        "key": "k",
        "version": "",
        "string_secret": "s",
        "binary_secret": None,
        "request_id": "r",
        "issued_at": 1,
    },
    "put_response": {"revision": 1, "error": None},
    "mapping_list": ["a", "b"],
    "mapping_request": {"secrets": ["a"], "request_id": "r", "issued_at": 1},
    "admin_request": {"request_id": "r", "issued_at": 1, "name": "n", "version": 2, "all": True},
}


def _decode_or_project_error(name: str, data: bytes) -> None:
    decode, allowed = DECODERS[name]
    try:
        decoded = decode(data)
    except allowed:
        return
    _accepts(decoded)


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_project_errors(name: str, data: bytes) -> None:
    _decode_or_project_error(name, data)


# Random JSON is mostly turned away at its top level (a decoder wants an object with its
# own keys, which random keys almost never are); 40 values per decoder cover that path,
# and drawing them is most of this file's run time. The deep type checks are the near-
# valid test's below, at hypothesis's full 100 mutations per decoder.
@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=40)
@given(value=json_values)
def test_arbitrary_json_raises_only_project_errors(name: str, value: Any) -> None:
    _decode_or_project_error(name, compact(value))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value a mutation can hit (dict keys and list indexes)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    if not rest and delete:
        del copy[head]
    else:
        copy[head] = _replace(copy[head], rest, new, delete)
    return copy


# 50 mutations per decoder (eight decoders: 400 a run): each mutates one field of a valid
# message, so a decoder that lets a library error or a traceback through fails on the
# first mutation of that field's type, well inside 50.
@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=50)
@given(data=st.data(), new=json_values, delete=st.booleans())
def test_near_valid_json_raises_only_project_errors(
    name: str, data: st.DataObject, new: Any, delete: bool
) -> None:
    body = VALID_BODIES[name]
    _decode_or_project_error(name, compact(body))  # the unmutated body is accepted
    path = data.draw(st.sampled_from(_paths(body)))
    _decode_or_project_error(name, compact(_replace(body, path, new, delete)))


# --- hypothesis: whatever the types encode decodes to an equal value ----------------------

uints = st.integers(min_value=0, max_value=UINT_MAX)
opt_text = st.none() | st.text()
request_ids = st.text(min_size=1)
secrets = st.one_of(
    st.builds(Secret.of_string, st.text(), st.text()),
    st.builds(Secret.of_bytes, st.text(), st.binary()),
)
secret_requests = st.builds(
    SecretRequest,
    key=st.text(),
    field=opt_text,
    version=opt_text,
    context=st.builds(
        Context,
        entity_jwt=st.text(),
        host_jwt=st.text(),
        application=st.builds(Application, name=opt_text, policy=st.text()),
    ),
)
# (string_secret, binary_secret) with exactly one set
values = st.one_of(
    st.tuples(st.text(), st.none()),
    st.tuples(st.none(), st.binary().map(list)),
)
put_requests = st.builds(
    lambda key, version, value: PutSecretRequest(key, version, *value),
    st.text(),
    st.text(),
    values,
)
admin_put_requests = st.builds(
    lambda key, version, value, rid, at: AdminPutSecretRequest(
        key, version, *value, request_id=rid, issued_at=at
    ),
    st.text(),
    st.text(),
    values,
    request_ids,
    uints,
)
mapping_requests = st.builds(MappingRequest, st.lists(st.text(), min_size=1), request_ids, uints)
admin_requests = st.builds(
    AdminRequest,
    request_id=request_ids,
    issued_at=uints,
    name=opt_text,
    version=st.none() | uints,
    all=st.booleans(),
    entity=opt_text,
)
protocol_errors = st.one_of(
    st.sampled_from([errors.UNIT_VARIANTS[v]() for v in UNIT_VARIANTS]),
    st.builds(
        lambda cls, text: cls(text), st.sampled_from(list(errors.TEXT_VARIANTS.values())), st.text()
    ),
)

roundtrip_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@roundtrip_settings
@given(secret=secrets)
def test_secret_responses_round_trip(secret: Secret) -> None:
    data = wire.encode_secret_response(secret)
    # The shape, checked against the stdlib's JSON rather than msgspec's own view of it.
    assert data == compact(
        {
            "secret": {
                "version": secret.version,
                "string_secret": secret.string_secret,
                "binary_secret": secret.binary_secret,
            }
        }
    )
    decoded = wire.decode_secret_response(data)
    assert decoded == secret
    assert decoded.value_bytes() == secret.value_bytes()


@given(version=st.text(), data=st.binary())
def test_binary_secrets_keep_every_byte(version: str, data: bytes) -> None:
    secret = Secret.of_bytes(version, data)
    decoded = wire.decode_secret_response(wire.encode_secret_response(secret))
    assert decoded.value_bytes() == data
    assert decoded.version == version


@given(text=st.text())
def test_string_secrets_are_utf8(text: str) -> None:
    decoded = wire.decode_secret_response(wire.encode_secret_response(Secret.of_string("1", text)))
    assert decoded.value_bytes() == text.encode("utf-8")


@given(err=protocol_errors)
def test_error_responses_round_trip(err: errors.ProtocolError) -> None:
    data = wire.encode_error_response(err)
    assert data == compact({"error": err.wire()})
    with pytest.raises(errors.ProtocolError) as caught:
        wire.decode_secret_response(data)
    assert type(caught.value) is type(err)
    assert caught.value.wire() == err.wire()


@given(req=secret_requests)
def test_secret_requests_round_trip(req: SecretRequest) -> None:
    data = wire.encode_secret_request(req)
    app = req.context.application
    assert data == compact(
        {
            "key": req.key,
            "field": req.field,
            "version": req.version,
            "context": {
                "entity_jwt": req.context.entity_jwt,
                "host_jwt": req.context.host_jwt,
                "application": {"name": app.name, "policy": app.policy},
            },
        }
    )
    assert wire.decode_secret_request(data) == req


@roundtrip_settings
@given(req=put_requests | admin_put_requests)
def test_put_requests_round_trip(req: PutSecretRequest) -> None:
    data = wire.encode_put_request(req)
    authenticated = isinstance(req, AdminPutSecretRequest)
    decoded = wire.decode_put_request(data, authenticated=authenticated)
    assert type(decoded) is type(req)
    assert decoded == req
    assert decoded.value_bytes() == req.value_bytes()
    assert wire.encode_put_request(decoded) == data


@given(revision=uints, err=st.none() | st.sampled_from(PUT_ERRORS))
def test_put_responses_round_trip(revision: int, err: str | None) -> None:
    error = None if err is None else wire.put_error_from_wire(err)
    data = wire.encode_put_response(revision, error)
    decoded = wire.decode_put_response(data)
    if error is None:
        assert decoded == PutSecretResponse(revision, None)
        assert decoded.result() == revision
    else:
        assert decoded == PutSecretResponse(0, err)
        with pytest.raises(type(error)):
            decoded.result()


@given(req=mapping_requests)
def test_mapping_requests_round_trip(req: MappingRequest) -> None:
    data = wire.encode_mapping_request(req)
    assert wire.decode_mapping_request(data, authenticated=True) == req
    bare = wire.encode_mapping_request(req.secrets)
    assert bare == compact(req.secrets)
    assert wire.decode_mapping_request(bare, authenticated=False) == req.secrets


@given(req=admin_requests)
def test_admin_requests_round_trip(req: AdminRequest) -> None:
    data = wire.encode_admin_request(req)
    decoded = wire.decode_admin_request(data)
    assert decoded == req
    assert wire.encode_admin_request(decoded) == data
