"""xkeys: curve keys and the xkv1 seal format, against NATS's vectors and as properties."""

from __future__ import annotations

from typing import Any

import nacl.public
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.errors import DecryptionError, InvalidKey
from secrets_nats_kv.nkeys import Role, SigningKey, decode_public, decode_seed, encode_public
from secrets_nats_kv.xkeys import HEADER, NONCE_SIZE, SealBox, XKey
from support.vectors import entries

# Fixed keys keep property tests fast; their seeds are random per run.
ALICE = XKey.generate()
BOB = XKey.generate()
EVE = XKey.generate()


def _no_inner_error(exc: BaseException) -> bool:
    """Whether `exc` shows no other exception as its cause or (unsuppressed) context."""
    return exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


# --- NATS's vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("entry", entries("nkeys", "curve"))
def test_vector_curve_seed_yields_its_public_key(entry: Any) -> None:
    key = XKey.from_seed(entry["seed"])
    assert key.public_key == entry["public_key"]
    assert key.seed == entry["seed"]
    assert key.has_private
    assert XKey.from_public(entry["public_key"]).public_key == entry["public_key"]


@pytest.mark.parametrize("entry", entries("xkeys", "seal"))
def test_vector_sealed_messages_open_and_reseal_identically(entry: Any) -> None:
    sender = XKey.from_seed(entry["sender_seed"])
    recipient = XKey.from_seed(entry["recipient_seed"])
    sealed = bytes.fromhex(entry["sealed_hex"])
    plaintext = bytes.fromhex(entry["plaintext_hex"])
    assert sender.public_key == entry["sender_public"]
    assert recipient.public_key == entry["recipient_public"]
    assert recipient.open(sealed, entry["sender_public"]) == plaintext
    assert SealBox(recipient, sender).open(sealed) == plaintext
    nonce = bytes.fromhex(entry["nonce_hex"])
    resealed = SealBox(sender, entry["recipient_public"])._seal_with_nonce(plaintext, nonce)
    assert resealed.hex() == entry["sealed_hex"]


@pytest.mark.parametrize("entry", entries("xkeys", "open_fail"))
def test_vector_bad_messages_do_not_open(entry: Any) -> None:
    recipient = XKey.from_seed(entry["recipient_seed"])
    sealed = bytes.fromhex(entry["sealed_hex"])
    with pytest.raises(DecryptionError):
        recipient.open(sealed, entry["sender_public"])
    with pytest.raises(DecryptionError):
        SealBox(recipient, entry["sender_public"]).open(sealed)


# --- the format -----------------------------------------------------------------------------


def test_layout_is_header_nonce_box() -> None:
    plaintext = b"sup3rs3cr3t"
    sealed = ALICE.seal(plaintext, BOB)
    assert sealed[:4] == HEADER == b"xkv1"
    nonce = sealed[4 : 4 + NONCE_SIZE]
    box = nacl.public.Box(
        nacl.public.PrivateKey(_raw_private(ALICE)), nacl.public.PublicKey(_raw_public(BOB))
    )
    assert sealed[4 + NONCE_SIZE :] == box.encrypt(plaintext, nonce).ciphertext
    assert len(sealed) == 4 + 24 + 16 + len(plaintext)


def _raw_private(key: XKey) -> bytes:
    return decode_seed(key.seed, Role.CURVE)[1]


def _raw_public(key: XKey) -> bytes:
    return decode_public(key.public_key, Role.CURVE)


def test_nonces_are_fresh() -> None:
    first, second = ALICE.seal(b"same", BOB), ALICE.seal(b"same", BOB)
    assert first[4:28] != second[4:28]
    assert BOB.open(first, ALICE) == BOB.open(second, ALICE) == b"same"


@given(plaintext=st.binary())
def test_xkey_round_trip(plaintext: bytes) -> None:
    sealed = ALICE.seal(plaintext, BOB.public_key)
    assert BOB.open(sealed, ALICE.public_key) == plaintext
    assert BOB.open(sealed, ALICE) == plaintext
    with pytest.raises(DecryptionError):
        EVE.open(sealed, ALICE)
    with pytest.raises(DecryptionError):
        BOB.open(sealed, EVE)


@given(plaintext=st.binary())
def test_sealbox_round_trip_and_interop_with_xkey(plaintext: bytes) -> None:
    alice_to_bob, bob_from_alice = SealBox(ALICE, BOB.public_key), SealBox(BOB, ALICE)
    assert bob_from_alice.open(alice_to_bob.seal(plaintext)) == plaintext
    assert BOB.open(alice_to_bob.seal(plaintext), ALICE) == plaintext
    assert bob_from_alice.open(ALICE.seal(plaintext, BOB)) == plaintext


@given(plaintext=st.binary())
def test_a_key_seals_to_itself(plaintext: bytes) -> None:
    at_rest = SealBox(ALICE, ALICE)
    assert at_rest.open(at_rest.seal(plaintext)) == plaintext
    assert ALICE.open(ALICE.seal(plaintext, ALICE), ALICE.public_key) == plaintext
    with pytest.raises(DecryptionError):
        SealBox(BOB, BOB).open(at_rest.seal(plaintext))


@given(data=st.data(), plaintext=st.binary(max_size=64))
def test_any_single_byte_change_fails_to_open(data: st.DataObject, plaintext: bytes) -> None:
    sealed = ALICE.seal(plaintext, BOB)
    index = data.draw(st.integers(0, len(sealed) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != sealed[index]))
    changed = sealed[:index] + bytes([value]) + sealed[index + 1 :]
    with pytest.raises(DecryptionError) as error:
        BOB.open(changed, ALICE)
    assert _no_inner_error(error.value)  # PyNaCl's CryptoError never escapes
    with pytest.raises(DecryptionError):
        SealBox(BOB, ALICE).open(changed)


@given(data=st.data(), plaintext=st.binary(max_size=64))
def test_any_truncation_fails_to_open(data: st.DataObject, plaintext: bytes) -> None:
    sealed = ALICE.seal(plaintext, BOB)
    cut = sealed[: data.draw(st.integers(0, len(sealed) - 1))]
    with pytest.raises(DecryptionError):
        BOB.open(cut, ALICE)


@pytest.mark.parametrize(
    "sealed",
    [b"", b"xkv1", b"xkv1" + bytes(24), b"xkv1" + bytes(24) + b"\x00", b"xkv1" + bytes(60)],
)
def test_short_or_empty_messages_fail_to_open(sealed: bytes) -> None:
    with pytest.raises(DecryptionError):
        BOB.open(sealed, ALICE)


@pytest.mark.parametrize(
    "sender",
    [
        "",
        "not a key",
        encode_public(Role.ACCOUNT, bytes(32)),  # an Ed25519 key, not a curve key
        "SXAC35QF3FMZXS2KGYXGF2DN45JSSDYQM3CQMWAZJW5NMA7Y7BCMVSWL4A",  # a seed, not a public key
    ],
)
def test_bad_sender_text_is_a_decryption_error(sender: str) -> None:
    sealed = ALICE.seal(b"hello", BOB)
    with pytest.raises(DecryptionError) as error:
        BOB.open(sealed, sender)
    assert _no_inner_error(error.value)  # the InvalidKey does not leak out
    if sender.startswith("S"):
        assert sender not in str(error.value)


# --- keys -----------------------------------------------------------------------------------


def test_public_only_keys() -> None:
    peer = XKey.from_public(BOB.public_key)
    assert not peer.has_private
    assert peer.public_key == BOB.public_key
    with pytest.raises(InvalidKey):
        _ = peer.seed
    with pytest.raises(InvalidKey):
        peer.seal(b"x", ALICE)
    with pytest.raises(InvalidKey):
        SealBox(peer, ALICE)
    with pytest.raises(DecryptionError):
        peer.open(ALICE.seal(b"x", BOB), ALICE)
    assert BOB.open(ALICE.seal(b"x", peer), ALICE) == b"x"


def test_key_text_of_the_wrong_kind_is_refused() -> None:
    account = SigningKey.generate(Role.ACCOUNT)
    with pytest.raises(InvalidKey):
        XKey.from_seed(account.seed)
    with pytest.raises(InvalidKey):
        XKey.from_public(account.public_key)
    with pytest.raises(InvalidKey):
        XKey.from_seed(ALICE.public_key)
    with pytest.raises(InvalidKey):
        XKey.from_public(ALICE.seed)
    with pytest.raises(InvalidKey):
        ALICE.seal(b"x", account.public_key)


def test_repr_and_str_never_show_the_seed() -> None:
    key = XKey.generate()
    for text in (repr(key), str(key), f"{key}", repr(SealBox(key, key))):
        assert key.seed not in text
        assert key.seed[2:20] not in text
        assert key.public_key in text
    assert str(key) == key.public_key


def test_derive_key_is_stable_per_context_and_needs_the_seed() -> None:
    again = XKey.from_seed(ALICE.seed)
    assert ALICE.derive_key(b"ctx") == again.derive_key(b"ctx")
    assert len(ALICE.derive_key(b"ctx")) == 32
    assert ALICE.derive_key(b"ctx") != ALICE.derive_key(b"other")
    assert ALICE.derive_key(b"ctx") != BOB.derive_key(b"ctx")
    assert _raw_private(ALICE) != ALICE.derive_key(b"")
    with pytest.raises(InvalidKey):
        XKey.from_public(ALICE.public_key).derive_key(b"ctx")
