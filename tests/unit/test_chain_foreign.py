"""Dropping entries not ours (`repair`), judged without a server.

A log of our events is built as the appender builds it, with junk anyone could publish
interleaved (untagged entries: the chain skips them). `repair` then appends a tagged
`ForeignDropped` naming the junk's positions and erases them. The reader must fold that
log to exactly the state the junk-filled one folds to (same versions, revisions,
mappings), must break where the event names a position that held one of our entries,
and must still break at any gap nobody names.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.chain import ChainBroken, ChainReader, Raw, Verified
from events.codec import EventCodec
from events.drop import find_foreign
from events.types import (
    Event,
    ForeignDropped,
    MappingAdded,
    MappingRemoved,
    SecretDestroyed,
    SecretPut,
    as_ranges,
    decode_event,
    encode_event,
)
from projections.audit import audit_record
from projections.state import Effect, ViewState, fold
from secrets_nats_kv.barrier import GENESIS, Barrier, digest
from secrets_nats_kv.xkeys import XKey

CODEC = EventCodec(Barrier(XKey.generate()))
ENTITY = "M" + "B" * 55
JUNK = b"junk"

steps = st.lists(
    st.sampled_from(["put-a", "put-b", "map", "unmap", "destroy-a", "junk", "junk", "junk"]),
    min_size=1,
    max_size=30,
).filter(lambda script: any(step != "junk" for step in script))


def _event(step: str) -> Event:
    kind, _, name = step.partition("-")
    if kind == "put":
        return SecretPut(at=1.0, name=name, sealed=CODEC.barrier.seal(b"v"))
    if kind == "destroy":
        return SecretDestroyed(at=1.0, name=name, all=True)
    cls = MappingAdded if kind == "map" else MappingRemoved
    return cls(at=1.0, entity=ENTITY, secrets=("a",))


def build(script: list[str]) -> tuple[list[Raw], str]:
    """The stored log (junk untagged, destroyed puts erased) and the link at its head."""
    stored: list[Raw] = []
    link = GENESIS
    for seq, step in enumerate(script, start=1):
        if step == "junk":
            stored.append(Raw(seq, float(seq), JUNK, {}))
            continue
        event = _event(step)
        if isinstance(event, SecretDestroyed):
            puts = [r.seq for r in stored if _is_put(r, event.name)]
            event = msgspec.structs.replace(
                event,
                erased_seqs=tuple(puts),
                erased_digests=tuple(digest(stored[s - 1].body or b"") for s in puts),
            )
        encoded = CODEC.encode(event, seq, link)
        link = encoded.link
        stored.append(Raw(seq, float(seq), encoded.body, encoded.headers))
        if isinstance(event, SecretDestroyed):
            for s in event.erased_seqs:
                stored[s - 1] = Raw(s, float(s), None)
    return stored, link


def _is_put(raw: Raw, name: str) -> bool:
    if raw.body is None or raw.body == JUNK:
        return False
    event = decode_event(raw.body)
    return isinstance(event, SecretPut) and event.name == name


def read(log: list[Raw]) -> tuple[list[Verified], ChainReader]:
    reader = ChainReader(CODEC)
    out: list[Verified] = []
    for raw in log:
        out += reader.push(raw)
    return out + reader.at_head(), reader


def folded(released: list[Verified]) -> tuple[ViewState, list[Effect]]:
    state, effects = ViewState(), []
    for entry in released:
        effects += fold(state, entry.seq, entry.event)
    return state, effects


def dropped(log: list[Raw], link: str, named: list[int]) -> list[Raw]:
    """`log` after `repair`: a `ForeignDropped` naming `named` appended, they erased."""
    runs = tuple(as_ranges(named))
    event = ForeignDropped(at=2.0, ranges=runs, count=len(named), reason="junk")
    encoded = CODEC.encode(event, len(log) + 1, link)
    after = [Raw(r.seq, r.time, None) if r.seq in named else r for r in log]
    return [*after, Raw(len(log) + 1, 9.0, encoded.body, encoded.headers)]


def _same_view(a: ViewState, b: ViewState) -> None:
    assert a.secrets == b.secrets
    assert a.mappings == b.mappings
    assert a.secrets_revision == b.secrets_revision
    assert a.state_revision == b.state_revision
    assert a.revision_of_seq == b.revision_of_seq
    assert a.erased_revisions == b.erased_revisions
    assert a.destroyed == b.destroyed


# 100 logs each (scripts of up to dozens of steps, junk runs among our events): a reader
# that misplaces the link across a dropped run fails on the first run of two or more.
@settings(max_examples=100, deadline=None)
@given(steps)
def test_dropping_the_foreign_entries_folds_to_the_same_state(script: list[str]) -> None:
    log, link = build(script)
    before_released, _ = read(log)
    before, before_effects = folded(before_released)
    found = find_foreign(CODEC, log)
    assert found.stored == [i for i, step in enumerate(script, start=1) if step == "junk"]
    assert found.link == link
    after_released, reader = read(dropped(log, link, found.stored))
    after, after_effects = folded(after_released)
    _same_view(before, after)
    assert after_effects == before_effects  # every KV write (revision numbers) unchanged
    assert after.rejected == 0
    assert reader.foreign == 0
    assert reader.dropped == len(found.stored)
    assert {v.seq for v in after_released} == {
        v.seq for v in before_released if v.seq not in found.stored
    } | {len(log) + 1}


@settings(max_examples=100, deadline=None)
@given(steps, st.data())
def test_naming_a_position_that_held_one_of_ours_breaks_the_chain(
    script: list[str], data: st.DataObject
) -> None:
    log, link = build(script)
    ours = [r.seq for r in log if r.body is not None and r.body != JUNK]
    if not ours:
        return
    victim = data.draw(st.sampled_from(ours))
    junk = [r.seq for r in log if r.body == JUNK]
    reader, released = ChainReader(CODEC), []
    for raw in dropped(log, link, sorted({*junk, victim})):
        released += reader.push(raw)
    with pytest.raises(ChainBroken):
        reader.at_head()
    # Nothing at or after the erased entry of ours is folded (what it revoked stays).
    assert all(v.seq < victim for v in released)


@settings(max_examples=100, deadline=None)
@given(steps, st.data())
def test_a_gap_the_event_does_not_name_still_breaks(script: list[str], data: st.DataObject) -> None:
    log, link = build([*script, "junk"])
    junk = [r.seq for r in log if r.body == JUNK]
    left_out = data.draw(st.sampled_from(junk))
    repaired = dropped(log, link, [seq for seq in junk if seq != left_out])
    repaired[left_out - 1] = Raw(left_out, 0.0, None)  # erased all the same
    with pytest.raises(ChainBroken) as broken:
        read(repaired)
    assert broken.value.seq == left_out


@settings(max_examples=100, deadline=None)
@given(steps)
def test_a_rewritten_log_links_dropped_positions_in_the_erased_form(script: list[str]) -> None:
    """As `rotate-key` copies a repaired log: every gap, dropped ones too, linked erased."""
    log, link = build(script)
    repaired = dropped(log, link, find_foreign(CODEC, log).stored)
    link, rewritten = GENESIS, []
    for raw in repaired:
        if raw.body is None or raw.body == JUNK:
            link = CODEC.erased_link(raw.seq, link)
            rewritten.append(Raw(raw.seq, raw.time, None))
            continue
        encoded = CODEC.encode_body(raw.body, raw.seq, link)
        link = encoded.link
        rewritten.append(Raw(raw.seq, raw.time, encoded.body, encoded.headers))
    expected, _ = read(repaired)
    assert [(v.seq, v.event) for v in read(rewritten)[0]] == [(v.seq, v.event) for v in expected]


def test_a_rerun_finds_named_junk_still_stored_and_the_log_reads() -> None:
    """Interrupted between the record and the erases: the named junk is just rejected."""
    log, link = build(["put-a", "junk", "junk", "map", "junk"])
    repaired = dropped(log, link, [2, 3, 5])
    half = [*repaired[:2], log[2], *repaired[3:]]  # #3 not erased yet
    found = find_foreign(CODEC, half)
    assert found.stored == [3]
    assert found.named == {2, 3, 5}
    released, reader = read(half)
    assert [v.seq for v in released] == [1, 3, 4, 6]
    assert reader.dropped == 2
    assert reader.foreign == 1


def test_a_position_after_the_event_is_not_named_by_it() -> None:
    log, link = build(["put-a", "junk"])
    event = ForeignDropped(at=2.0, ranges=((2, 4),), count=3)
    encoded = CODEC.encode(event, 3, link)
    log = [log[0], Raw(2, 0.0, None), Raw(3, 3.0, encoded.body, encoded.headers), Raw(4, 0.0, None)]
    with pytest.raises(ChainBroken) as broken:
        read(log)
    assert broken.value.seq == 4


def test_a_hundred_thousand_interleaved_positions_fit_one_event() -> None:
    runs = tuple((seq, seq) for seq in range(1, 2 * 8192, 2))  # the most one event carries
    event = ForeignDropped(at=2.0, ranges=runs, count=len(runs), reason="flood")
    assert len(encode_event(event)) < 200_000
    flood = ForeignDropped(at=2.0, ranges=tuple(as_ranges(range(10, 100_010))), count=100_000)
    assert len(encode_event(flood)) < 200
    assert sum(1 for _ in flood.positions()) == 100_000


def test_the_audit_shows_the_record() -> None:
    log, link = build(["put-a", "junk", "junk"])
    released, _ = read(dropped(log, link, [2, 3]))
    state, _ = folded(released)
    record = audit_record(_entry(released[-1]), state)
    assert record.type == "foreign_dropped"
    assert record.dropped == [(2, 3)]
    assert record.counts == {"dropped": 2}
    assert record.reason == "junk"


def _entry(verified: Verified) -> object:
    from events.log import LogEntry

    return LogEntry(verified.seq, verified.time, verified.event, verified.digest, verified.link)
