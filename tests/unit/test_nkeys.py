"""nkeys: the text codec against NATS's own vectors and properties, and Ed25519 signing keys."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.errors import InvalidKey
from secrets_nats_kv.nkeys import (
    ED25519_ROLES,
    Role,
    SigningKey,
    crc16_xmodem,
    decode_public,
    decode_seed,
    encode_public,
    encode_seed,
    role_of,
    verify,
)
from support.vectors import REPO_COPY, SHARED_COPY, entries, load_vectors

raws = st.binary(min_size=32, max_size=32)
roles = st.sampled_from(list(Role))
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _raw_text(body: bytes) -> str:
    """Hand-made nkey text (body + CRC) for prefixes the codec itself would never write."""
    data = body + crc16_xmodem(body).to_bytes(2, "little")
    return base64.b32encode(data).decode().rstrip("=")


# --- the codec ------------------------------------------------------------------------------


def test_crc16_xmodem_check_value() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the catalogued check value
    assert crc16_xmodem(b"") == 0


@pytest.mark.parametrize(
    ("role", "letter"),
    [
        (Role.ACCOUNT, "A"),
        (Role.CLUSTER, "C"),
        (Role.MODULE, "M"),
        (Role.SERVER, "N"),
        (Role.OPERATOR, "O"),
        (Role.USER, "U"),
        (Role.SERVICE, "V"),
        (Role.CURVE, "X"),
    ],
)
def test_role_prefixes_give_the_documented_letters(role: Role, letter: str) -> None:
    assert role.letter == letter
    assert encode_public(role, bytes(32))[0] == letter
    assert encode_seed(role, bytes(32))[:2] == "S" + letter


@given(role=roles, raw=raws)
def test_public_key_round_trip(role: Role, raw: bytes) -> None:
    text = encode_public(role, raw)
    assert len(text) == 56
    assert decode_public(text, role) == raw
    assert decode_public(text) == raw
    assert role_of(text) is role


@given(role=roles, raw=raws)
def test_seed_round_trip(role: Role, raw: bytes) -> None:
    text = encode_seed(role, raw)
    assert len(text) == 58
    assert text.startswith("S" + role.letter)
    assert decode_seed(text, role) == (role, raw)
    assert decode_seed(text) == (role, raw)


@given(data=st.data(), role=roles, raw=raws)
def test_decoding_as_another_role_raises(data: st.DataObject, role: Role, raw: bytes) -> None:
    other = data.draw(st.sampled_from([r for r in Role if r is not role]))
    public, seed = encode_public(role, raw), encode_seed(role, raw)
    with pytest.raises(InvalidKey) as public_error:
        decode_public(public, other)
    assert public_error.value.found == role.key_phrase()
    with pytest.raises(InvalidKey) as seed_error:
        decode_seed(seed, other)
    assert seed_error.value.found == role.seed_phrase()
    assert seed not in str(seed_error.value)


@given(role=roles, raw=raws)
def test_seed_and_public_key_are_never_taken_for_each_other(role: Role, raw: bytes) -> None:
    public, seed = encode_public(role, raw), encode_seed(role, raw)
    with pytest.raises(InvalidKey) as as_public:
        decode_public(seed)
    assert as_public.value.found == role.seed_phrase()
    assert seed not in str(as_public.value)
    with pytest.raises(InvalidKey):
        role_of(seed)
    with pytest.raises(InvalidKey) as as_seed:
        decode_seed(public)
    assert as_seed.value.found == role.key_phrase()


@given(data=st.data(), role=roles, raw=raws, seed=st.booleans())
def test_any_single_character_change_is_rejected(
    data: st.DataObject, role: Role, raw: bytes, seed: bool
) -> None:
    """CRC-16 catches any burst of <= 16 bits; a seed's 3 spare bits must be zero (canonical)."""
    text = encode_seed(role, raw) if seed else encode_public(role, raw)
    index = data.draw(st.integers(0, len(text) - 1))
    char = data.draw(st.characters().filter(lambda c: c != text[index]))
    changed = text[:index] + char + text[index + 1 :]
    decode = decode_seed if seed else decode_public
    with pytest.raises(InvalidKey) as error:
        decode(changed)
    assert changed not in str(error.value)


def test_non_canonical_base32_is_rejected() -> None:
    seed = encode_seed(Role.ACCOUNT, bytes(range(32)))
    # The last character of a seed carries 2 data bits and 3 spare bits: set a spare bit.
    spare = ALPHABET[ALPHABET.index(seed[-1]) ^ 1]
    odd = seed[:-1] + spare
    assert base64.b32decode(odd + "======") == base64.b32decode(seed + "======")
    with pytest.raises(InvalidKey) as error:
        decode_seed(odd)
    assert error.value.found == "text that is not base32"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("", "empty text"),
        ("XNOTAKEY", "text of 8 characters (a public key has 56, a seed 58)"),
        ("x" * 56, "text that is not base32"),
        ("1" * 56, "text that is not base32"),
        ("É" * 56, "text that is not base32"),
        (_raw_text(bytes([8]) + bytes(32)), "a key with unknown prefix byte 0x08"),
        (_raw_text(bytes([18 << 3, 1 << 3]) + bytes(32)), "a seed with an unknown prefix"),
        (_raw_text(bytes([17 << 3, 0]) + bytes(32)), "a seed with an unknown prefix"),
    ],
)
def test_malformed_text_is_described(text: str, found: str) -> None:
    with pytest.raises(InvalidKey) as error:
        decode_public(text)
    assert error.value.found == found
    with pytest.raises(InvalidKey):
        decode_seed(text)


def test_raw_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        encode_public(Role.ACCOUNT, bytes(31))
    with pytest.raises(ValueError, match="32 raw bytes"):
        encode_seed(Role.ACCOUNT, bytes(33))


# --- NATS's vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("entry", entries("nkeys", "ed25519"))
def test_vector_ed25519_seed_yields_its_public_key(entry: Any) -> None:
    role = Role[entry["role"].upper()]
    key = SigningKey.from_seed(entry["seed"])
    assert key.role is role
    assert key.public_key == entry["public_key"]
    assert key.seed == entry["seed"]
    assert SigningKey.from_seed(entry["seed"], role).public_key == entry["public_key"]
    assert role_of(entry["public_key"]) is role
    with pytest.raises(InvalidKey):
        SigningKey.from_seed(entry["seed"], *(r for r in ED25519_ROLES if r is not role))


@pytest.mark.parametrize("entry", entries("nkeys", "curve"))
def test_vector_curve_seed_is_a_curve_seed(entry: Any) -> None:
    assert decode_seed(entry["seed"])[0] is Role.CURVE
    assert role_of(entry["public_key"]) is Role.CURVE
    with pytest.raises(InvalidKey) as error:
        SigningKey.from_seed(entry["seed"])
    assert error.value.found == "a curve seed (SX…)"


@pytest.mark.parametrize(
    "entry", entries("nkeys", "module_keys") + entries("nkeys", "service_keys")
)
def test_vector_module_and_service_keys_decode_with_their_role(entry: Any) -> None:
    role = Role[entry["role"].upper()]
    assert role in (Role.MODULE, Role.SERVICE)
    text = entry["public_key"]
    assert role_of(text) is role
    assert len(decode_public(text, role)) == 32
    assert encode_public(role, decode_public(text, role)) == text
    with pytest.raises(InvalidKey) as error:
        decode_public(text, Role.ACCOUNT)
    assert error.value.found == role.key_phrase()


@pytest.mark.parametrize("entry", entries("nkeys", "invalid"))
def test_vector_invalid_keys_are_rejected(entry: Any) -> None:
    text = entry["input"]
    if text.startswith("S"):
        with pytest.raises(InvalidKey) as error:
            decode_seed(text, Role.CURVE)
        assert text not in str(error.value)
    if not text.startswith("S"):
        with pytest.raises(InvalidKey):
            decode_public(text, Role.CURVE)


def test_vector_signature_is_reproduced_and_verifies() -> None:
    """Ed25519 is deterministic: our signature over a vector JWT equals the JS library's."""
    data = load_vectors()
    account = next(e for e in data["nkeys"]["ed25519"] if e["role"] == "account")
    token = next(e for e in data["jwts"] if e["name"] == "component")["jwt"]
    signed, signature_text = token.rsplit(".", 1)
    signature = base64.urlsafe_b64decode(signature_text + "==")
    assert SigningKey.from_seed(account["seed"]).sign(signed.encode()) == signature
    assert verify(account["public_key"], signed.encode(), signature)


# --- SigningKey and verify ------------------------------------------------------------------


@given(role=st.sampled_from(ED25519_ROLES), message=st.binary())
def test_sign_then_verify(role: Role, message: bytes) -> None:
    key = SigningKey.generate(role)
    signature = key.sign(message)
    assert len(signature) == 64
    assert verify(key.public_key, message, signature)
    assert not verify(key.public_key, message + b"!", signature)
    assert not verify(SigningKey.generate(role).public_key, message, signature)
    assert SigningKey.from_seed(key.seed).public_key == key.public_key


def test_verify_rejects_tampered_and_malformed_signatures() -> None:
    key = SigningKey.generate(Role.ACCOUNT)
    signature = key.sign(b"hello")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify(key.public_key, b"hello", flipped)
    assert not verify(key.public_key, b"hello", signature[:63])
    assert not verify(key.public_key, b"hello", b"")


def test_verify_raises_on_bad_key_text() -> None:
    key = SigningKey.generate(Role.ACCOUNT)
    signature = key.sign(b"hello")
    with pytest.raises(InvalidKey):
        verify(key.public_key[:-1], b"hello", signature)
    with pytest.raises(InvalidKey):
        verify(key.seed, b"hello", signature)
    with pytest.raises(InvalidKey) as error:
        verify(encode_public(Role.CURVE, bytes(32)), b"hello", signature)
    assert error.value.found == "a curve key (X…)"


def test_curve_role_cannot_sign() -> None:
    with pytest.raises(ValueError, match="curve key cannot sign"):
        SigningKey.generate(Role.CURVE)


def test_signing_key_repr_shows_only_the_public_key() -> None:
    key = SigningKey.generate(Role.SERVER)
    assert key.public_key in repr(key)
    assert key.seed not in repr(key)
    assert key.seed not in str(key)
    assert key.seed[2:20] not in repr(key)


def test_the_repo_copy_of_the_vectors_is_the_shared_one() -> None:
    """The repo keeps a copy so a clone alone runs every vector; it must not drift."""
    assert REPO_COPY.is_file()
    if SHARED_COPY.is_file():  # beside a checkout of the steering repo, and in CI
        assert REPO_COPY.read_bytes() == SHARED_COPY.read_bytes()
    assert load_vectors()["nkeys"]
