"""Wascap JWTs: NATS/wascap vectors, minted tokens, tampering, expiry and the verify cache."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv import jwt
from secrets_nats_kv.errors import InvalidJWT, InvalidKey
from secrets_nats_kv.jwt import Claims, verify_entity_jwt, verify_host_jwt
from secrets_nats_kv.nkeys import Role, SigningKey
from support.tokens import encode_jwt, mint_component_jwt, mint_host_jwt, mint_provider_jwt
from support.vectors import entries

ACCOUNT = SigningKey.generate(Role.ACCOUNT)
MODULE = SigningKey.generate(Role.MODULE)
SERVICE = SigningKey.generate(Role.SERVICE)
HOST = SigningKey.generate(Role.SERVER)
NOW = 1_800_000_000

# What a rejected vector's reason must mention, by the vector's `why`.
REASON_FOR_WHY = {
    "expired": "expired at",
    "not yet valid": "not valid until",
    "algorithm is not Ed25519": "Ed25519",
    "signature does not verify against iss": "signature does not verify",
    "signature does not verify": "signature does not verify",
    "not three segments": "not three segments",
    "bad signature encoding": "signature is not unpadded base64url",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(header: bytes, claims: dict[str, Any], signer: SigningKey) -> str:
    """A token with any header, signed properly: isolates the check under test."""
    signed = f"{_b64(header)}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def _claims(iss: str, sub: str, **more: Any) -> dict[str, Any]:
    return {"jti": "J1", "iat": NOW - 60, "iss": iss, "sub": sub, **more}


def _reason(token: str, *, host: bool = False, now: float = NOW) -> str:
    with pytest.raises(InvalidJWT) as error:
        (verify_host_jwt if host else verify_entity_jwt)(token, now)
    reason = error.value.reason
    assert str(error.value) == reason
    for segment in token.split("."):
        if len(segment) > 8:
            assert segment not in reason
    return reason


# --- vectors --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", entries("jwts"))
def test_vector_jwts(entry: Any) -> None:
    verify = verify_host_jwt if entry["kind"] == "host" else verify_entity_jwt
    if entry["valid"]:
        claims = verify(entry["jwt"])
        assert claims.kind == entry["kind"]
        assert claims.sub == entry["subject"]
        return
    with pytest.raises(InvalidJWT) as error:
        verify(entry["jwt"])
    reason = error.value.reason
    assert entry["jwt"] not in reason
    for segment in entry["jwt"].split("."):
        if len(segment) > 8:
            assert segment not in reason
    if entry.get("why") in REASON_FOR_WHY:
        assert REASON_FOR_WHY[entry["why"]] in reason


@pytest.mark.parametrize("entry", entries("jwts"))
def test_vector_jwts_are_not_valid_as_the_other_kind(entry: Any) -> None:
    other = verify_entity_jwt if entry["kind"] == "host" else verify_host_jwt
    with pytest.raises(InvalidJWT):
        other(entry["jwt"])


# --- minted tokens --------------------------------------------------------------------------


def test_minted_tokens_verify_with_their_kind_and_metadata() -> None:
    component = verify_entity_jwt(
        mint_component_jwt(ACCOUNT, MODULE.public_key, name="dog", exp=NOW + 60, iat=NOW - 1), NOW
    )
    assert (component.kind, component.sub, component.iss) == (
        "component",
        MODULE.public_key,
        ACCOUNT.public_key,
    )
    assert (component.name, component.exp, component.nbf, component.iat) == (
        "dog",
        NOW + 60,
        None,
        NOW - 1,
    )
    assert len(component.jti) == 22
    provider = verify_entity_jwt(mint_provider_jwt(ACCOUNT, SERVICE.public_key, nbf=NOW), NOW)
    assert (provider.kind, provider.sub, provider.name, provider.nbf) == (
        "provider",
        SERVICE.public_key,
        "provider",
        NOW,
    )
    host = verify_host_jwt(mint_host_jwt(ACCOUNT, HOST.public_key, labels={"zone": "a"}), NOW)
    assert (host.kind, host.sub, host.name) == ("host", HOST.public_key, "host")
    self_signed = verify_host_jwt(mint_host_jwt(HOST, HOST.public_key), NOW)
    assert self_signed.iss == self_signed.sub == HOST.public_key


def test_minted_claims_have_wascap_shape() -> None:
    token = mint_component_jwt(ACCOUNT, MODULE.public_key, name="c", iat=NOW)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert list(claims) == ["jti", "iat", "iss", "sub", "wascap", "wascap_revision"]
    assert claims["wascap"] == {
        "name": "c",
        "hash": "",
        "tags": [],
        "rev": 0,
        "ver": "0.1.0",
        "prov": False,
    }
    assert claims["wascap_revision"] == 3
    header = base64.urlsafe_b64decode(token.split(".")[0] + "==")
    assert header == b'{"typ":"jwt","alg":"Ed25519"}'
    timed = mint_host_jwt(ACCOUNT, HOST.public_key, labels={"a": "b"}, exp=NOW + 9, nbf=NOW)
    host_claims = json.loads(base64.urlsafe_b64decode(timed.split(".")[1] + "=="))
    assert next(iter(host_claims)) == "exp"
    assert host_claims["nbf"] == NOW
    assert host_claims["wascap"] == {"name": "host", "labels": {"a": "b"}}


def test_minting_checks_the_subject_role() -> None:
    with pytest.raises(InvalidKey, match="module key"):
        mint_component_jwt(ACCOUNT, SERVICE.public_key)
    with pytest.raises(InvalidKey, match="service key"):
        mint_provider_jwt(ACCOUNT, MODULE.public_key)
    with pytest.raises(InvalidKey, match="server key"):
        mint_host_jwt(ACCOUNT, MODULE.public_key)


@given(data=st.data(), segment=st.sampled_from([1, 2]))
def test_any_single_character_change_fails_with_invalid_jwt(
    data: st.DataObject, segment: int
) -> None:
    token = mint_component_jwt(ACCOUNT, MODULE.public_key, name="tamper", iat=NOW)
    parts = token.split(".")
    index = data.draw(st.integers(0, len(parts[segment]) - 1))
    char = data.draw(st.characters().filter(lambda c: c != parts[segment][index]))
    parts[segment] = parts[segment][:index] + char + parts[segment][index + 1 :]
    changed = ".".join(parts)
    with pytest.raises(InvalidJWT) as error:
        verify_entity_jwt(changed, NOW)
    assert changed not in error.value.reason


# --- expiry and the cache -------------------------------------------------------------------


def test_expiry_is_checked_on_every_call_even_when_cached() -> None:
    token = mint_component_jwt(ACCOUNT, MODULE.public_key, exp=NOW + 100)
    hits = jwt._verified.cache_info().hits
    assert verify_entity_jwt(token, NOW).exp == NOW + 100
    assert verify_entity_jwt(token, NOW + 100).sub == MODULE.public_key  # exp == now: still valid
    assert jwt._verified.cache_info().hits == hits + 1
    reason = _reason(token, now=NOW + 101)
    assert reason == "expired at 2027-01-15T08:01:40Z"
    assert verify_entity_jwt(token, NOW).sub == MODULE.public_key


def test_not_before_is_checked_on_every_call() -> None:
    token = mint_host_jwt(ACCOUNT, HOST.public_key, nbf=NOW)
    assert _reason(token, host=True, now=NOW - 1) == "not valid until 2027-01-15T08:00:00Z"
    assert verify_host_jwt(token, NOW).nbf == NOW
    assert _reason(token, host=True, now=NOW - 0.5).startswith("not valid until")


def test_default_clock_is_now() -> None:
    past = mint_component_jwt(ACCOUNT, MODULE.public_key, exp=1_000_000_000)  # 2001
    future = mint_component_jwt(ACCOUNT, MODULE.public_key, exp=4_102_444_800)  # 2100
    assert verify_entity_jwt(future).exp == 4_102_444_800
    with pytest.raises(InvalidJWT, match="expired at 2001-09-09T01:46:40Z"):
        verify_entity_jwt(past)
    assert verify_entity_jwt(past, 1_000_000_000).exp == 1_000_000_000


def test_far_future_times_do_not_break_the_reason() -> None:
    token = mint_component_jwt(ACCOUNT, MODULE.public_key, nbf=10**15)
    assert _reason(token) == "not valid until 1000000000000000 seconds after the epoch"


def test_a_failure_is_not_cached_as_a_success() -> None:
    token = mint_host_jwt(ACCOUNT, HOST.public_key)
    for _ in range(2):
        assert _reason(token).startswith("subject is a server key")  # not an entity
        assert verify_host_jwt(token, NOW).kind == "host"


# --- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b'{"typ":"jwt","alg":"none"}', "bad algorithm 'none' (want Ed25519)"),
        (b'{"typ":"jwt","alg":"ed25519"}', "bad algorithm 'ed25519' (want Ed25519)"),
        (b'{"typ":"jwt","alg":"HS256"}', "bad algorithm 'HS256' (want Ed25519)"),
        (b'{"typ":"jwt","alg":1}', "bad algorithm 1 (want Ed25519)"),
        (b'{"typ":"jwt"}', "bad header: no algorithm (want Ed25519)"),
        (b'{"alg":"Ed25519"}', "bad header: no type (want jwt)"),
        (b'{"typ":"jws","alg":"Ed25519"}', "bad type 'jws' (want jwt)"),
        (b'{"typ":null,"alg":"Ed25519"}', "bad type None (want jwt)"),
        (b'["jwt","Ed25519"]', "malformed: header is not a JSON object"),
        (b"jwt", "malformed: header is not JSON"),
        (b'{"typ":"jwt","alg":"Ed25519\xff"}', "malformed: header is not JSON"),
        (b'{"typ":"jwt","alg":"' + b"x" * 100 + b'"}', "bad algorithm 'xxxxxxxx"),
    ],
)
def test_bad_headers(header: bytes, reason: str) -> None:
    token = _token(header, _claims(ACCOUNT.public_key, MODULE.public_key), ACCOUNT)
    assert _reason(token).startswith(reason)
    assert len(_reason(token)) < 80


def test_header_type_is_case_insensitive_and_extra_fields_are_ignored() -> None:
    claims = _claims(ACCOUNT.public_key, MODULE.public_key)
    for header in (b'{"typ":"JWT","alg":"Ed25519"}', b'{"alg":"Ed25519","typ":"Jwt","kid":"k"}'):
        assert verify_entity_jwt(_token(header, claims, ACCOUNT), NOW).kind == "component"


def test_padding_is_refused_as_wascap_does() -> None:
    """PROTOCOL §4: segments are unpadded; wascap's decoder refuses `=`, and so do we."""

    def pad(segment: str) -> str:
        return segment + "=" * (-len(segment) % 4)

    header = _b64(b'{"typ":"jwt","alg":"Ed25519"}')
    body = _b64(json.dumps(_claims(ACCOUNT.public_key, MODULE.public_key)).encode())
    signed = f"{header}.{body}"
    signature = _b64(ACCOUNT.sign(signed.encode()))
    assert verify_entity_jwt(f"{signed}.{signature}", NOW).sub == MODULE.public_key
    assert "=" in pad(signature)
    padded = f"{signed}.{pad(signature)}"  # the same signature over the same bytes
    assert _reason(padded) == "malformed: signature is not unpadded base64url"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed: not three segments"),
        ("a.b", "malformed: not three segments"),
        ("a.b.c.d", "malformed: not three segments"),
        ("x" * (64 * 1024 + 1), "malformed: longer than 65536 characters"),
        ("e+J9.e30.AA", "malformed: header is not unpadded base64url"),
        ("eyJ9=x.e30.AA", "malformed: header is not unpadded base64url"),
        ("eyJ0eXAiOiJqd3QiLCJhbGciOiJFZDI1NTE5In1.e30.AA", "malformed: header is not canonical"),
        ("eyJ0eXAiOiJqd3QiLCJhbGciOiJFZDI1NTE5In0.e30.AA", "malformed claims: "),
    ],
)
def test_malformed_tokens(token: str, reason: str) -> None:
    assert _reason(token).startswith(reason)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (
            {"iat": NOW, "iss": "I", "sub": "S"},
            "malformed claims: `jti` is missing",
        ),
        (
            {"jti": "J", "iss": "I", "sub": "S"},
            "malformed claims: `iat` is missing",
        ),
        (
            {"jti": "J", "iat": NOW, "sub": "S"},
            "malformed claims: `iss` is missing",
        ),
        (
            {"jti": "J", "iat": NOW, "iss": "I"},
            "malformed claims: `sub` is missing",
        ),
        (
            {"jti": "J", "iat": 1.5, "iss": "I", "sub": "S"},
            "malformed claims: `iat` has the wrong type or value",
        ),
        (
            {"jti": "J", "iat": -1, "iss": "I", "sub": "S"},
            "malformed claims: `iat` has the wrong type or value",
        ),
        (
            {"jti": "J", "iat": NOW, "iss": "I", "sub": "S", "exp": "soon"},
            "malformed claims: `exp` has the wrong type or value",
        ),
        (
            {"jti": "J", "iat": NOW, "iss": "I", "sub": "S", "wascap": []},
            "malformed claims: `wascap` has the wrong type or value",
        ),
        ({"jti": "J", "iat": NOW, "iss": "", "sub": "S"}, "issuer (iss) is empty"),
        ({"jti": "J", "iat": NOW, "iss": "I", "sub": ""}, "subject (sub) is empty"),
        ({"jti": "J", "iat": NOW, "iss": "I", "sub": "S"}, "issuer is not an Ed25519 public key"),
    ],
)
def test_bad_claims(claims: dict[str, Any], reason: str) -> None:
    token = _token(b'{"typ":"jwt","alg":"Ed25519"}', claims, ACCOUNT)
    assert _reason(token).startswith(reason)


def test_short_signature_is_malformed() -> None:
    token = mint_component_jwt(ACCOUNT, MODULE.public_key)
    head, body, signature = token.split(".")
    assert _reason(f"{head}.{body}.{signature[:40]}").startswith("malformed: signature is 30 bytes")


def test_signature_must_be_by_the_issuer() -> None:
    other = SigningKey.generate(Role.ACCOUNT)
    token = _token(
        b'{"typ":"jwt","alg":"Ed25519"}', _claims(ACCOUNT.public_key, MODULE.public_key), other
    )
    assert _reason(token) == f"signature does not verify against issuer {ACCOUNT.public_key}"


# --- roles of issuer and subject ------------------------------------------------------------


def _signed(issuer: SigningKey, sub: str) -> str:
    return encode_jwt(_claims(issuer.public_key, sub), issuer)


def test_entity_subject_must_be_a_module_or_service_key() -> None:
    reason = _reason(_signed(ACCOUNT, ACCOUNT.public_key))
    assert reason == (
        "subject is an account key (A…) where a component (M…) or provider (V…) key is expected"
    )
    assert _reason(_signed(ACCOUNT, HOST.public_key)).startswith("subject is a server key (N…)")


def test_entity_issuer_must_be_an_account() -> None:
    assert _reason(_signed(HOST, MODULE.public_key)) == (
        "issuer is a server key (N…) where an account key (A…) is expected"
    )
    assert _reason(_signed(MODULE, MODULE.public_key)).startswith("issuer is a module key (M…)")


def test_host_subject_must_be_a_server_key() -> None:
    assert _reason(_signed(ACCOUNT, MODULE.public_key), host=True) == (
        "subject is a module key (M…) where a host (N…) key is expected"
    )


def test_host_issuer_is_an_account_or_the_host_itself() -> None:
    assert verify_host_jwt(_signed(HOST, HOST.public_key), NOW).iss == HOST.public_key
    other_host = SigningKey.generate(Role.SERVER)
    assert _reason(_signed(other_host, HOST.public_key), host=True).startswith(
        "issuer is another server key"
    )
    operator = SigningKey.generate(Role.OPERATOR)
    assert _reason(_signed(operator, HOST.public_key), host=True).startswith(
        "issuer is an operator key (O…)"
    )


def test_issuer_and_subject_must_be_public_keys_and_seeds_are_never_echoed() -> None:
    seed_as_sub = _reason(_signed(ACCOUNT, MODULE.seed))
    assert seed_as_sub == "subject is not a public nkey: found a module seed (SM…)"
    assert MODULE.seed not in seed_as_sub
    curve_issuer = _reason(
        _token(b'{"typ":"jwt","alg":"Ed25519"}', _claims("X" * 56, "M"), ACCOUNT)
    )
    assert curve_issuer.startswith("issuer is not an Ed25519 public key: found")


def test_claims_are_frozen() -> None:
    claims = verify_entity_jwt(mint_component_jwt(ACCOUNT, MODULE.public_key), NOW)
    assert isinstance(claims, Claims)
    with pytest.raises(AttributeError):
        claims.sub = "M"  # type: ignore[misc]


def test_claims_that_are_not_utf8_are_malformed() -> None:
    header, body = _b64(b'{"typ":"jwt","alg":"Ed25519"}'), _b64(b'{"jti":"\xff"}')
    signed = f"{header}.{body}"
    token = f"{signed}.{_b64(ACCOUNT.sign(signed.encode()))}"
    assert _reason(token) == "malformed claims: not UTF-8"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    header=st.dictionaries(st.sampled_from(["typ", "alg", "kid"]), json_values, max_size=3),
    claims=st.dictionaries(
        st.sampled_from(["jti", "iat", "iss", "sub", "exp", "nbf", "wascap"]), json_values
    ),
)
def test_any_signed_json_is_verified_or_invalid_jwt(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    token = _token(json.dumps(header).encode(), claims, ACCOUNT)
    for verify in (verify_entity_jwt, verify_host_jwt):
        with contextlib.suppress(InvalidJWT):  # any other exception fails the test
            verify(token, NOW)


@given(text=st.text())
def test_any_text_is_invalid_jwt(text: str) -> None:
    with pytest.raises(InvalidJWT):
        verify_entity_jwt(text, NOW)


# --- valid tokens with one claim mutated: every example reaches the claims ------------------

_PAST_THE_CLAIMS_DECODE = ("malformed claims", "issuer", "subject", "signature does not verify")
_BEFORE_THE_CLAIMS = ("malformed: header", "bad header", "bad algorithm", "bad type", "segments")
_MINTERS = {
    "component": (lambda: mint_component_jwt(ACCOUNT, MODULE.public_key, iat=NOW - 60), False),
    "provider": (lambda: mint_provider_jwt(ACCOUNT, SERVICE.public_key, iat=NOW - 60), False),
    "host": (lambda: mint_host_jwt(ACCOUNT, HOST.public_key, iat=NOW - 60), True),
}
_CLAIMS = ("jti", "iat", "iss", "sub", "exp", "nbf", "wascap", "wascap_revision")
_OTHER_KEYS = [SigningKey.generate(role).public_key for role in Role if role is not Role.CURVE]


def _decoded_claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


claim_values = st.one_of(
    json_values,
    st.sampled_from(_OTHER_KEYS),
    st.integers(NOW - 10_000, NOW + 10_000),
    st.integers(-5, 2**64),
)


@given(
    kind=st.sampled_from(sorted(_MINTERS)),
    field=st.sampled_from(_CLAIMS),
    how=st.sampled_from(["replace", "delete", "metadata"]),
    value=claim_values,
    metadata_field=st.sampled_from(["name", "tags", "prov", "labels", "rev", "ver", "hash"]),
)
def test_a_valid_token_with_one_claim_mutated_is_verified_or_refused_for_its_claims(
    kind: str, field: str, how: str, value: Any, metadata_field: str
) -> None:
    """Unlike arbitrary signed JSON, these get past the header every time: the mutation
    is judged by the claim checks (decode, issuer, subject, kind, signature, clock)."""
    mint, host = _MINTERS[kind]
    claims = _decoded_claims(mint())
    if how == "delete":
        claims.pop(field, None)
    elif how == "metadata" and isinstance(claims.get("wascap"), dict):
        claims["wascap"][metadata_field] = value
    else:
        claims[field] = value
    token = encode_jwt(claims, ACCOUNT)
    verify = verify_host_jwt if host else verify_entity_jwt
    try:
        verified = verify(token, NOW)
    except InvalidJWT as error:
        reason = error.reason
        assert not any(early in reason for early in _BEFORE_THE_CLAIMS), reason
        assert "\n" not in reason
        return
    # Accepted: what was verified is what was signed.
    assert verified.iss == claims["iss"] == ACCOUNT.public_key
    assert verified.sub == claims["sub"]
    assert verified.jti == claims["jti"]
    assert verified.exp == claims.get("exp")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("jti", "another id", None),
        ("exp", NOW + 60, None),
        ("exp", NOW - 1, "expired at"),
        ("nbf", NOW + 60, "not valid until"),
        ("iat", -1, "malformed claims"),
        ("sub", "", "subject (sub) is empty"),
        ("iss", "", "issuer (iss) is empty"),
        ("iss", SigningKey.generate(Role.ACCOUNT).public_key, "signature does not verify"),
        ("sub", HOST.public_key, "subject is"),
    ],
)
def test_one_mutated_claim_gets_the_reason_for_that_claim(
    field: str, value: Any, reason: str | None
) -> None:
    claims = _decoded_claims(_MINTERS["component"][0]())
    claims[field] = value
    token = encode_jwt(claims, ACCOUNT)
    if reason is None:
        assert verify_entity_jwt(token, NOW).sub == claims["sub"]
    else:
        assert reason in _reason(token)
