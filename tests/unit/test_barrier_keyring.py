"""The barrier as a keyring: the current key seals and tags, the next one is recognised.

An online rotation needs a backend that opens values and tells tags made under either
key, while everything it writes stays under the current one until it adopts the next.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.xkeys import XKey

OLD, NEW, OTHER = XKey.generate(), XKey.generate(), XKey.generate()


def test_the_current_key_seals_and_tags_and_either_key_opens() -> None:
    ring = Barrier(OLD, NEW)
    assert (ring.public_key, ring.next_public_key) == (OLD.public_key, NEW.public_key)
    sealed = ring.seal(b"value")
    assert Barrier(OLD).open(sealed) == b"value"
    with pytest.raises(DecryptionError):
        Barrier(NEW).open(sealed)
    assert ring.open(Barrier(NEW).seal(b"next")) == b"next"
    assert ring.tag(3, b"body") == Barrier(OLD).tag(3, b"body")
    assert ring.kv_tag("B", "k", 2, b"v") == Barrier(OLD).kv_tag("B", "k", 2, b"v")


def test_a_value_under_neither_key_does_not_open() -> None:
    with pytest.raises(DecryptionError):
        Barrier(OLD, NEW).open(Barrier(OTHER).seal(b"value"))


def test_tags_say_which_held_key_made_them_and_verify_under_the_current_only() -> None:
    ring = Barrier(OLD, NEW)
    new_tag = Barrier(NEW).tag(7, b"body")
    assert ring.tagged_by(7, b"body", new_tag) == NEW.public_key
    assert ring.tagged_by(7, b"body", ring.tag(7, b"body")) == OLD.public_key
    assert ring.tagged_by(8, b"body", new_tag) is None  # bound to its position
    assert ring.tagged_by(7, b"body", Barrier(OTHER).tag(7, b"body")) is None
    assert not ring.verify(7, b"body", new_tag)  # a log is read under one key
    kv = Barrier(NEW).kv_tag("B", "k", 1, b"v")
    assert ring.kv_tagged_by("B", "k", 1, b"v", kv) == NEW.public_key
    assert ring.kv_tagged_by("B", "k", 2, b"v", kv) is None


def test_adopting_the_next_key_switches_every_use_in_place() -> None:
    ring = Barrier(OLD, NEW)
    before = ring.seal(b"old value")
    ring.adopt(NEW.public_key)
    assert (ring.public_key, ring.next_public_key) == (NEW.public_key, None)
    assert Barrier(NEW).open(ring.seal(b"x")) == b"x"
    assert ring.tag(1, b"b") == Barrier(NEW).tag(1, b"b")
    assert ring.link(1, "00" * 32, "0" * 64) == Barrier(NEW).link(1, "00" * 32, "0" * 64)
    assert ring.open(before) == b"old value"  # a get answered from the state before
    assert ring.tagged_by(1, b"b", Barrier(OLD).tag(1, b"b")) is None  # the old key tags nothing


def test_adopting_without_keeping_the_old_key_forgets_it() -> None:
    ring = Barrier(OLD, NEW)
    before = ring.seal(b"old value")
    ring.adopt(NEW.public_key, keep_old=False)
    with pytest.raises(DecryptionError):
        ring.open(before)


def test_only_the_held_next_key_can_be_adopted_or_read_alone() -> None:
    ring = Barrier(OLD, NEW)
    with pytest.raises(KeyError):
        ring.adopt(OTHER.public_key)
    with pytest.raises(KeyError):
        ring.alone(OTHER.public_key)
    alone = ring.alone(NEW.public_key)
    assert (alone.public_key, alone.next_public_key) == (NEW.public_key, None)
    assert ring.holds(NEW.public_key)
    assert not ring.holds(OTHER.public_key)


def test_a_next_key_equal_to_the_current_one_is_no_next_key() -> None:
    assert Barrier(OLD, OLD).next_public_key is None


def test_the_keyring_shows_public_keys_only() -> None:
    shown = repr(Barrier(OLD, NEW))
    assert OLD.public_key in shown
    assert NEW.public_key in shown
    assert OLD.seed not in shown
    assert NEW.seed not in shown


@given(st.binary(max_size=64), st.booleans())
def test_whatever_either_held_key_sealed_opens(plaintext: bytes, by_next: bool) -> None:
    ring = Barrier(OLD, NEW)
    sealed = Barrier(NEW if by_next else OLD).seal(plaintext)
    assert ring.open(sealed) == plaintext
