"""The chained log judged without a server: what `ChainReader` releases and where it breaks.

A log is built as the appender builds it (through `EventCodec`), with destroys that
erase the bytes they name, then tampered with as an attacker with no key could: delete,
reorder, replace with an entry of another history, truncate, append forgeries. The
reader must release exactly the untouched history, or break at a named position.
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.chain import ChainBroken, ChainReader, Raw, Verified, WrongKey
from events.codec import EventCodec
from events.types import (
    Event,
    LogRepaired,
    MappingAdded,
    MappingRemoved,
    Rejected,
    SecretDestroyed,
    SecretPut,
    encode_event,
)
from secrets_nats_kv.barrier import CHAIN_HEADER, ENTRY_TAG_HEADER, GENESIS, Barrier, digest
from secrets_nats_kv.xkeys import XKey

KEY = XKey.generate()
CODEC = EventCodec(Barrier(KEY))
ENTITY = "M" + "A" * 55


def put(name: str, value: bytes = b"v") -> SecretPut:
    return SecretPut(at=1.0, name=name, sealed=CODEC.barrier.seal(value))


def build(events: list[Event], codec: EventCodec = CODEC) -> list[Raw]:
    """The stored log of `events`, destroys filled in and their entries erased, as live."""
    stored: list[Raw] = []
    link = GENESIS
    for seq, event in enumerate(events, start=1):
        if isinstance(event, SecretDestroyed):
            puts = [r.seq for r in stored if r.body is not None and _is_put(r, event.name)]
            event = msgspec.structs.replace(
                event,
                erased_seqs=tuple(puts),
                erased_digests=tuple(digest(stored[s - 1].body or b"") for s in puts),
            )
        encoded = codec.encode(event, seq, link)
        link = encoded.link
        stored.append(Raw(seq, float(seq), encoded.body, encoded.headers))
        if isinstance(event, SecretDestroyed):
            for s in event.erased_seqs:
                stored[s - 1] = Raw(s, float(s), None)
    return stored


def _is_put(raw: Raw, name: str) -> bool:
    event = CODEC.decode(raw.body or b"")
    return isinstance(event, SecretPut) and event.name == name


def read(log: list[Raw], codec: EventCodec = CODEC, **kwargs: object) -> list[Verified]:
    reader = ChainReader(codec, **kwargs)  # type: ignore[arg-type]
    out: list[Verified] = []
    for raw in log:
        out += reader.push(raw)
    return out + reader.at_head()


def gap(seq: int) -> Raw:
    return Raw(seq, 0.0, None)


HISTORY: list[Event] = [
    put("a"),
    MappingAdded(at=1.0, entity=ENTITY, secrets=("a",)),
    put("b"),
    MappingRemoved(at=1.0, entity=ENTITY, secrets=("a",)),
    put("a", b"new"),
    SecretDestroyed(at=1.0, name="b", all=True),
    put("c"),
]


def test_an_untouched_log_reads_whole_erased_puts_included() -> None:
    log = build(HISTORY)
    assert log[2].body is None  # b's put was erased by the destroy at 6
    out = read(log)
    assert [v.seq for v in out] == list(range(1, 8))
    assert out[2].event is None
    assert out[2].digest
    assert isinstance(out[3].event, MappingRemoved)


@pytest.mark.parametrize("deleted", [1, 2, 4, 5, 6, 7])
def test_deleting_any_entry_no_destroy_names_breaks_at_it(deleted: int) -> None:
    log = build(HISTORY)
    log[deleted - 1] = gap(deleted)
    with pytest.raises(ChainBroken) as broken:
        read(log)
    # Without the destroy at 6, its erased put at 3 is the first unexplained position.
    assert broken.value.seq == (3 if deleted == 6 else deleted)
    # Nothing at or after the break was released (the revocation cannot be skipped).
    reader, released = ChainReader(CODEC), []
    for raw in log:
        released += reader.push(raw)
    assert all(v.seq < deleted for v in released)


def test_a_deleted_tail_breaks_at_its_position() -> None:
    log = build(HISTORY)
    log.append(gap(8))  # the stream's last sequence is 8, its message is gone
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq == 8


def test_reordered_entries_break_the_chain() -> None:
    log = build(HISTORY)
    first, second = log[0], log[1]
    log[0] = Raw(1, 1.0, second.body, second.headers)
    log[1] = Raw(2, 2.0, first.body, first.headers)
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq == 4  # 1, 2 are foreign where they stand; 3 is a gap, 4 unlinked


def test_an_entry_of_another_history_in_its_place_breaks_the_chain() -> None:
    other = build([put("a"), MappingAdded(at=1.0, entity=ENTITY, secrets=("x",)), *HISTORY[2:]])
    log = build(HISTORY)
    log[1] = other[1]  # same key, same position, a different body: tags verify, link not
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq == 2


def test_forgeries_are_skipped_and_the_chain_goes_on_after_them() -> None:
    log = build(HISTORY)
    body = encode_event(MappingAdded(at=1.0, entity=ENTITY, secrets=("a",)))
    stranger = EventCodec(Barrier(XKey.generate()))
    log.append(Raw(8, 8.0, body, {}))
    log.append(Raw(9, 9.0, body, stranger.encode_body(body, 9, GENESIS).headers))
    log.append(Raw(10, 10.0, log[1].body, log[1].headers))  # a real entry replayed later
    head = read(log[:7])[-1].link
    real = CODEC.encode(put("d"), 11, head)
    log.append(Raw(11, 11.0, real.body, real.headers))
    out = read(log)
    assert [type(v.event) for v in out[7:10]] == [Rejected] * 3
    assert isinstance(out[10].event, SecretPut)
    assert out[10].link == real.link


def test_a_wrong_key_reads_nothing_and_says_so() -> None:
    with pytest.raises(WrongKey):
        read(build(HISTORY), EventCodec(Barrier(XKey.generate())))


def test_a_chain_header_changed_by_anyone_breaks_it() -> None:
    log = build(HISTORY)
    headers = {**(log[3].headers or {}), CHAIN_HEADER: "0" * 64}
    log[3] = dataclasses.replace(log[3], headers=headers)
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq == 4


def test_a_repair_accepts_a_lost_entry_on_the_record() -> None:
    log = build(HISTORY)
    log[3] = gap(4)  # the revocation deleted
    repair = LogRepaired(at=2.0, lost=(4,), relinked=(5,), reason="test")
    assumed = read(log, assume=repair)  # what `repair` computes before writing its event
    encoded = CODEC.encode(repair, 8, assumed[-1].link)
    log.append(Raw(8, 8.0, encoded.body, encoded.headers))
    out = read(log)
    assert [v.seq for v in out] == list(range(1, 9))
    assert isinstance(out[-1].event, LogRepaired)
    # A repair naming a different position does not accept this gap.
    wrong = LogRepaired(at=2.0, lost=(5,), relinked=(6,))
    log[-1] = Raw(8, 8.0, *_pair(CODEC.encode(wrong, 8, assumed[-1].link)))
    with pytest.raises(ChainBroken):
        read(log)


def _pair(encoded: object) -> tuple[bytes, dict[str, str]]:
    return encoded.body, encoded.headers  # type: ignore[attr-defined]


def test_a_rewritten_log_links_erased_positions_in_the_erased_form() -> None:
    log = build(HISTORY)
    # As rotate-key writes it: the gap at 3 linked without its bytes.
    link = GENESIS
    rewritten: list[Raw] = []
    for raw in log:
        if raw.body is None:
            link = CODEC.erased_link(raw.seq, link)
            rewritten.append(raw)
            continue
        encoded = CODEC.encode_body(raw.body, raw.seq, link)
        link = encoded.link
        rewritten.append(Raw(raw.seq, raw.time, encoded.body, encoded.headers))
    assert [v.seq for v in read(rewritten)] == list(range(1, 8))


events = st.lists(
    st.sampled_from(["put-a", "put-b", "map", "unmap", "destroy-a", "destroy-b"]),
    min_size=1,
    max_size=25,
)


def to_events(script: list[str]) -> list[Event]:
    made: list[Event] = []
    for step in script:
        kind, _, name = step.partition("-")
        if kind == "put":
            made.append(put(name))
        elif kind == "destroy":
            made.append(SecretDestroyed(at=1.0, name=name, all=True))
        else:
            cls = MappingAdded if kind == "map" else MappingRemoved
            made.append(cls(at=1.0, entity=ENTITY, secrets=("a",)))
    return made


@settings(max_examples=200, deadline=None)
@given(events, st.data())
def test_any_single_deletion_is_caught_or_was_a_destroy(
    script: list[str], data: st.DataObject
) -> None:
    log = build(to_events(script))
    assert [v.seq for v in read(log)] == list(range(1, len(log) + 1))
    present = [r.seq for r in log if r.body is not None]
    victim = data.draw(st.sampled_from(present))
    log[victim - 1] = gap(victim)
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq <= victim


@settings(max_examples=200, deadline=None)
@given(events, st.data())
def test_entries_released_are_always_the_genuine_prefix(
    script: list[str], data: st.DataObject
) -> None:
    """Whatever an attacker deletes or swaps, what is released is a prefix of the truth."""
    truth = build(to_events(script))
    log = list(truth)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(log) - 1))
        j = data.draw(st.integers(0, len(log) - 1))
        if data.draw(st.booleans()):
            log[i] = gap(i + 1)
        else:
            a, b = log[i], log[j]
            log[i] = Raw(i + 1, 0.0, b.body, b.headers)
            log[j] = Raw(j + 1, 0.0, a.body, a.headers)
    reader, released = ChainReader(CODEC), []
    try:
        for raw in log:
            released += reader.push(raw)
        released += reader.at_head()
    except (ChainBroken, WrongKey):
        pass
    expected = {v.seq: v.event for v in read(truth)}
    for verified in released:
        if not isinstance(verified.event, Rejected):
            assert verified.event == expected[verified.seq]


def test_the_barrier_never_shows_its_keys() -> None:
    barrier = Barrier(KEY)
    assert KEY.seed not in repr(barrier)
    assert "hidden" in repr(barrier)
    assert ENTRY_TAG_HEADER in CODEC.encode(put("a"), 1, GENESIS).headers
