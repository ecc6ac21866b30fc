"""The fold as plain data: revisions, redelivery, delete/undelete/destroy and mappings.

`fold` does no I/O, so every rule it keeps is checked here on values, without NATS, and
the rules that must hold for every history are hypothesis properties. The last property
is the one a restart, `rebuild` and `audit export` rely on: a history whose destroyed
puts have been erased from the log must fold to the same view and the same KV buckets
as the live fold that saw those puts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.log import LogEntry
from events.types import (
    Event,
    FenceLifted,
    KeyRotated,
    MappingAdded,
    MappingRemoved,
    Rejected,
    SecretDeleted,
    SecretDestroyed,
    SecretKind,
    SecretPut,
    SecretUndeleted,
    WritesFenced,
)
from projections.audit import audit_record
from projections.state import (
    Effect,
    EraseEvents,
    EraseSecretRevisions,
    Fence,
    FillErasedRevision,
    MarkSecretDeleted,
    PutMappingEntry,
    PutSecretEntry,
    ViewState,
    fold,
    shred_plan,
)
from secrets_nats_kv.errors import SecretNotFound

AT = 1_700_000_000.0
Entry = tuple[int, Event | Rejected | None]


def sealed(label: str) -> bytes:
    """Stand-in ciphertext: the fold never opens it, only moves it around."""
    return b"xkv1" + label.encode().ljust(40, b".")


def put(name: str, label: str, *, kind: SecretKind = "string", at: float = AT) -> SecretPut:
    return SecretPut(name=name, sealed=sealed(label), kind=kind, at=at)


def fold_all(
    entries: list[Entry], state: ViewState | None = None
) -> tuple[ViewState, list[Effect]]:
    state = state if state is not None else ViewState()
    effects: list[Effect] = []
    for seq, event in entries:
        effects.extend(fold(state, seq, event))
    return state, effects


def numbered(events: list[Event | Rejected | None], start: int = 1) -> list[Entry]:
    return list(enumerate(events, start))


# --- an online rotation's fence -----------------------------------------------------------


def test_a_fence_records_its_key_run_and_position_and_writes_nothing() -> None:
    state, effects = fold_all(
        numbered([put("a", "v1"), WritesFenced(new_key="XNEW", rotation="r1", at=AT)])
    )
    assert state.fence == Fence("XNEW", "r1", 2)
    assert effects == [PutSecretEntry("a", 1, sealed("v1"), "string")]
    assert state.secrets_revision == 1
    assert state.last_seq == 2


@pytest.mark.parametrize(
    "end",
    [
        FenceLifted(rotation="r1", reason="aborted", at=AT),
        KeyRotated(old_key="XOLD", new_key="XNEW", at=AT),
    ],
)
def test_a_lifted_fence_or_the_rotated_logs_marker_ends_it(end: Event) -> None:
    state, effects = fold_all(numbered([WritesFenced(new_key="XNEW", rotation="r1", at=AT), end]))
    assert state.fence is None
    assert effects == []
    assert state.encryption_key == ("XNEW" if isinstance(end, KeyRotated) else None)


def test_the_fence_is_the_newest_one_folded() -> None:
    state, _ = fold_all(
        numbered(
            [
                WritesFenced(new_key="X1", rotation="r1", at=AT),
                FenceLifted(rotation="r1", at=AT),
                put("a", "v1"),
                WritesFenced(new_key="X2", rotation="r2", at=AT),
            ]
        )
    )
    assert state.fence == Fence("X2", "r2", 4)


# --- revisions ---------------------------------------------------------------------------


def test_revisions_count_puts_deletes_undeletes_and_erased_entries() -> None:
    entries = numbered(
        [
            put("a", "a1"),  # 1 -> revision 1
            put("b", "b1"),  # 2 -> revision 2
            MappingAdded(entity="E", secrets=("a",), at=AT),  # 3: state bucket only
            SecretDeleted(name="a", at=AT),  # 4 -> revision 3
            SecretUndeleted(name="a", at=AT),  # 5 -> revision 4
            None,  # 6: an erased put -> revision 5
            SecretDestroyed(name="b", versions=(2,), erased_seqs=(2,), at=AT),  # 7: none
            KeyRotated(old_key="XOLD", new_key="XNEW", at=AT),  # 8: none
            Rejected(reason="forged"),  # 9: none
            put("a", "a2"),  # 10 -> revision 6
        ]
    )
    state, _ = fold_all(entries)
    assert state.revision_of_seq == {1: 1, 2: 2, 4: 3, 5: 4, 6: 5, 10: 6}
    assert state.secrets_revision == 6
    assert state.state_revision == 1
    assert state.last_seq == 10
    assert state.encryption_key == "XNEW"
    assert state.secrets["a"].revisions == [1, 3, 4, 6]


def test_an_erased_entry_spends_one_revision_as_an_erased_placeholder() -> None:
    state = ViewState()
    assert fold(state, 1, put("a", "a1")) == [PutSecretEntry("a", 1, sealed("a1"), "string")]
    assert fold(state, 2, None) == [FillErasedRevision(2)]
    assert fold(state, 3, put("a", "a2")) == [PutSecretEntry("a", 3, sealed("a2"), "string")]
    assert state.secrets["a"].revisions == [1, 3]  # the gap belongs to no secret


def test_redelivered_entries_change_nothing() -> None:
    state, _ = fold_all(numbered([put("a", "a1"), put("a", "a2"), SecretDeleted(name="a", at=AT)]))
    before = copy.deepcopy(state)
    # The same positions again, even carrying other events: ignored.
    assert fold(state, 1, put("z", "z1")) == []
    assert fold(state, 2, None) == []
    assert fold(state, 3, SecretUndeleted(name="a", at=AT)) == []
    assert fold(state, 0, put("a", "a9")) == []
    assert state == before


def test_rejected_entries_only_move_the_position() -> None:
    state, _ = fold_all(numbered([put("a", "a1"), MappingAdded(entity="E", secrets=("a",), at=AT)]))
    expected = copy.deepcopy(state)
    assert fold(state, 3, Rejected(reason="tag does not match its position")) == []
    expected.last_seq = 3
    expected.rejected = 1  # counted, so start-up knows the log was not read whole
    assert state == expected
    # The next real event gets the next revision as if the rejected one were not there.
    assert fold(state, 4, put("a", "a2")) == [PutSecretEntry("a", 2, sealed("a2"), "string")]


# --- delete and undelete -----------------------------------------------------------------


def test_delete_hides_the_latest_and_every_pinned_version_but_keeps_them() -> None:
    state, _ = fold_all(numbered([put("a", "a1"), put("a", "a2")]))
    effects = fold(state, 3, SecretDeleted(name="a", at=AT + 3))
    assert effects == [MarkSecretDeleted("a", 3)]
    record = state.secrets["a"]
    assert record.deleted
    assert record.latest() is None
    assert record.version(1) is None
    assert record.version(2) is None
    kept = record.newest_readable()
    assert kept is not None
    assert (kept.revision, kept.sealed) == (2, sealed("a2"))  # history kept for undelete
    assert record.updated_at == AT + 3


def test_undelete_restores_the_newest_readable_value_as_a_new_revision() -> None:
    state, _ = fold_all(
        numbered([put("a", "a1"), put("a", "a2", kind="binary"), SecretDeleted(name="a", at=AT)])
    )
    effects = fold(state, 4, SecretUndeleted(name="a", at=AT + 4))
    assert effects == [PutSecretEntry("a", 4, sealed("a2"), "binary")]
    record = state.secrets["a"]
    assert not record.deleted
    latest = record.latest()
    assert latest is not None
    assert (latest.revision, latest.origin, latest.sealed, latest.kind) == (
        4,
        2,
        sealed("a2"),
        "binary",
    )
    pinned_1, pinned_2 = record.version(1), record.version(2)
    assert pinned_1 is not None
    assert pinned_1.sealed == sealed("a1")
    assert pinned_2 is not None
    assert pinned_2.sealed == sealed("a2")


def test_undelete_skips_destroyed_versions() -> None:
    state, _ = fold_all(
        numbered(
            [
                put("a", "a1"),
                put("a", "a2"),
                SecretDestroyed(name="a", versions=(2,), erased_seqs=(2,), at=AT),
                SecretDeleted(name="a", at=AT),
            ]
        )
    )
    assert fold(state, 5, SecretUndeleted(name="a", at=AT)) == [
        PutSecretEntry("a", 4, sealed("a1"), "string")
    ]


# --- destroy -----------------------------------------------------------------------------


def _copied_history() -> ViewState:
    """put a1 (rev 1), put a2 (rev 2), delete (rev 3), undelete (rev 4, a copy of a2)."""
    entries = numbered(
        [
            put("a", "a1"),
            put("a", "a2"),
            SecretDeleted(name="a", at=AT),
            SecretUndeleted(name="a", at=AT),
        ]
    )
    state, _ = fold_all(entries)
    return state


@pytest.mark.parametrize("chosen", [2, 4])
def test_destroying_a_version_shreds_it_and_every_copy_sharing_its_origin(chosen: int) -> None:
    state = _copied_history()
    versions, seqs = shred_plan(state.secrets["a"], chosen)
    assert versions == (2, 4)  # the put and the undelete's copy of it, either way round
    assert seqs == (2,)  # the log entry holding those bytes
    event = SecretDestroyed(name="a", versions=versions, erased_seqs=seqs, at=AT + 5)
    effects = fold(state, 5, event)
    assert effects == [EraseSecretRevisions((2, 4)), EraseEvents((2,))]
    record = state.secrets["a"]
    assert all(v.sealed != sealed("a2") for v in record.versions.values())
    assert state.destroyed[5] == (2, 4)
    # The newest entry left is the delete marker: deleted again, as the KV bucket shows it.
    assert record.deleted
    assert record.latest() is None
    assert fold(state, 6, SecretUndeleted(name="a", at=AT)) == [
        PutSecretEntry("a", 5, sealed("a1"), "string")
    ]
    assert record.version(2) is None
    assert record.version(4) is None
    pinned = record.version(1)
    assert pinned is not None
    assert pinned.sealed == sealed("a1")


def test_destroying_a_put_that_followed_a_delete_leaves_the_secret_deleted() -> None:
    """put, delete, put, destroy the new put: the old value must not come back."""
    state, _ = fold_all(numbered([put("a", "a1"), SecretDeleted(name="a", at=AT), put("a", "a2")]))
    record = state.secrets["a"]
    assert not record.deleted
    fold(state, 4, SecretDestroyed(name="a", versions=(3,), erased_seqs=(3,), at=AT))
    assert record.deleted
    assert record.latest() is None
    assert record.version(1) is None


def test_destroy_all_removes_the_secret_and_lists_every_revision() -> None:
    state = _copied_history()
    versions, seqs = shred_plan(state.secrets["a"], None)
    assert versions == (1, 2, 3, 4)  # delete markers too: every KV revision of the key
    assert seqs == (1, 2)
    effects = fold(
        state, 5, SecretDestroyed(name="a", versions=versions, erased_seqs=seqs, all=True, at=AT)
    )
    assert effects == [EraseSecretRevisions((1, 2, 3, 4)), EraseEvents((1, 2))]
    assert "a" not in state.secrets
    assert state.destroyed[5] == (1, 2, 3, 4)
    # The name can be used again; revisions keep counting.
    assert fold(state, 6, put("a", "new")) == [PutSecretEntry("a", 5, sealed("new"), "string")]
    assert state.secrets["a"].revisions == [5]


def test_shred_plan_refuses_what_cannot_be_destroyed() -> None:
    state = _copied_history()
    record = state.secrets["a"]
    with pytest.raises(SecretNotFound):
        shred_plan(record, 3)  # a delete marker holds no value
    with pytest.raises(SecretNotFound):
        shred_plan(record, 99)
    fold(state, 5, SecretDestroyed(name="a", versions=(2, 4), erased_seqs=(2,), at=AT))
    with pytest.raises(SecretNotFound):
        shred_plan(record, 2)  # already destroyed


# --- mappings ----------------------------------------------------------------------------


def test_mapping_changes_write_the_whole_allow_list_to_the_state_bucket() -> None:
    state = ViewState()
    assert fold(state, 1, MappingAdded(entity="E", secrets=("b", "a"), at=AT)) == [
        PutMappingEntry("E", 1, ("a", "b"))
    ]
    assert fold(state, 2, MappingAdded(entity="E", secrets=("c", "a"), at=AT)) == [
        PutMappingEntry("E", 2, ("a", "b", "c"))
    ]
    assert fold(state, 3, MappingRemoved(entity="E", secrets=("a", "zz"), at=AT)) == [
        PutMappingEntry("E", 3, ("b", "c"))
    ]
    assert fold(state, 4, MappingRemoved(entity="F", secrets=("a",), at=AT)) == [
        PutMappingEntry("F", 4, ())
    ]
    assert state.mappings == {"E": {"b", "c"}, "F": set()}
    assert state.secrets_revision == 0  # the secrets bucket is untouched


# --- the KV buckets the effects describe -------------------------------------------------


@dataclass
class KvModel:
    """What the two buckets hold after a list of effects, checking each write's revision."""

    secrets: dict[int, tuple[str, bytes, str]] = field(default_factory=dict)
    state: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    secrets_last: int = 0
    state_last: int = 0
    erased_events: set[int] = field(default_factory=set)

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case PutSecretEntry(key, revision, value, kind):
                    self._next_secret(revision)
                    self.secrets[revision] = (key, value, kind)
                case MarkSecretDeleted(key, revision):
                    self._next_secret(revision)
                    self.secrets[revision] = (key, b"", "DEL")
                case FillErasedRevision(revision):
                    self._next_secret(revision)  # written, then erased at once
                case EraseSecretRevisions(revisions):
                    for revision in revisions:
                        self.secrets.pop(revision, None)
                case EraseEvents(seqs):
                    self.erased_events.update(seqs)
                case PutMappingEntry(entity, revision, names):
                    assert revision == self.state_last + 1, "state bucket revisions must be dense"
                    self.state_last = revision
                    self.state[revision] = (entity, names)

    def _next_secret(self, revision: int) -> None:
        assert revision == self.secrets_last + 1, "secrets bucket revisions must be dense"
        self.secrets_last = revision


# --- arbitrary histories (not necessarily ones the actors would write) --------------------

NAMES = ["a", "b", "c"]
ENTITIES = ["EA", "EB"]
names_ = st.sampled_from(NAMES)
times = st.floats(min_value=AT, max_value=AT + 1e6, allow_nan=False)

any_event: st.SearchStrategy[Event | Rejected | None] = st.one_of(
    st.builds(
        SecretPut,
        name=names_,
        sealed=st.binary(min_size=1, max_size=8),
        kind=st.sampled_from(["string", "binary"]),
        at=times,
    ),
    st.builds(SecretDeleted, name=names_, at=times),
    st.builds(SecretUndeleted, name=names_, at=times),
    st.builds(
        SecretDestroyed,
        name=names_,
        versions=st.lists(st.integers(1, 30), max_size=4).map(tuple),
        erased_seqs=st.lists(st.integers(1, 30), max_size=3).map(tuple),
        all=st.booleans(),
        at=times,
    ),
    st.builds(
        MappingAdded,
        entity=st.sampled_from(ENTITIES),
        secrets=st.lists(names_, max_size=3).map(tuple),
        at=times,
    ),
    st.builds(
        MappingRemoved,
        entity=st.sampled_from(ENTITIES),
        secrets=st.lists(names_, max_size=3).map(tuple),
        at=times,
    ),
    st.builds(KeyRotated, old_key=st.just("XOLD"), new_key=st.sampled_from(["X1", "X2"]), at=times),
    st.builds(WritesFenced, new_key=st.sampled_from(["X1", "X2"]), rotation=st.just("r"), at=times),
    st.builds(FenceLifted, rotation=st.just("r"), at=times),
    st.builds(Rejected, reason=st.just("forged")),
    st.none(),
)
histories = st.lists(any_event, max_size=40).map(numbered)


@given(entries=histories, data=st.data())
def test_incremental_fold_equals_batch_fold(entries: list[Entry], data: st.DataObject) -> None:
    batch, batch_effects = fold_all(entries)
    cut = data.draw(st.integers(0, len(entries)), label="cut")
    first, first_effects = fold_all(entries[:cut])
    resumed = copy.deepcopy(first)  # as if the first part had been kept and reloaded
    resumed, rest_effects = fold_all(entries[cut:], resumed)
    assert resumed == batch
    assert first_effects + rest_effects == batch_effects


@given(entries=histories, data=st.data())
def test_redelivering_any_part_of_the_log_changes_nothing(
    entries: list[Entry], data: st.DataObject
) -> None:
    once, once_effects = fold_all(entries)
    cut = data.draw(st.integers(0, len(entries)), label="cut")
    again, effects = fold_all(entries[:cut])
    _, repeated = fold_all(entries[:cut], again)  # a consumer restarting from 1
    assert repeated == []
    again, rest = fold_all(entries[cut:], again)
    _, everything_again = fold_all(entries, again)
    assert everything_again == []
    assert again == once
    assert effects + rest == once_effects


REVISION_EFFECTS = (PutSecretEntry, MarkSecretDeleted, FillErasedRevision)


@given(entries=histories)
def test_one_dense_secrets_revision_per_value_entry(entries: list[Entry]) -> None:
    state = ViewState()
    model = KvModel()
    written: list[int] = []
    for seq, event in entries:
        effects = fold(state, seq, event)
        model.apply(effects)  # asserts every write is exactly the next revision
        revisions = [e.revision for e in effects if isinstance(e, REVISION_EFFECTS)]
        counts = event is None or isinstance(event, SecretPut | SecretDeleted | SecretUndeleted)
        assert len(revisions) == (1 if counts else 0)
        written += revisions
        mapping_writes = [e for e in effects if isinstance(e, PutMappingEntry)]
        assert len(mapping_writes) == (1 if isinstance(event, MappingAdded | MappingRemoved) else 0)
    assert written == list(range(1, len(written) + 1))
    assert state.secrets_revision == len(written)


# --- histories the actors write, refolded after destroy erased their puts -----------------

OPS = ["put", "put", "delete", "undelete", "destroy", "destroy_all", "map_add", "map_remove"]
# Two names, so most commands meet the same secret and its history gets tangled.
commands = st.lists(
    st.tuples(st.sampled_from(OPS), st.sampled_from(NAMES[:2]), st.integers(0, 1_000)),
    max_size=40,
)


def decide(state: ViewState, seq: int, op: str, name: str, n: int) -> Event | None:
    """The event the lifecycle and command actors would append, or None if they refuse."""
    at = AT + seq
    record = state.secrets.get(name)
    if op == "put":
        kind: SecretKind = "binary" if n % 2 else "string"
        return put(name, f"{name}@{seq}", kind=kind, at=at)
    if op in ("map_add", "map_remove"):
        kind_ = MappingAdded if op == "map_add" else MappingRemoved
        return kind_(entity=ENTITIES[n % 2], secrets=(name,), at=at)
    if record is None:
        return None
    if op == "delete":
        return None if record.latest() is None else SecretDeleted(name=name, at=at)
    if op == "undelete":
        if not record.deleted or record.newest_readable() is None:
            return None
        return SecretUndeleted(name=name, at=at)
    live = sorted(v.revision for v in record.live_versions())
    try:
        if op == "destroy":
            if not live:
                return None
            versions, seqs = shred_plan(record, live[n % len(live)])
        else:
            versions, seqs = shred_plan(record, None)
    except SecretNotFound:
        return None
    return SecretDestroyed(
        name=name, versions=versions, erased_seqs=seqs, all=op == "destroy_all", at=at
    )


Check = Callable[[list[Entry], ViewState, KvModel], None]


def live_history(
    ops: list[tuple[str, str, int]], after_each: Check | None = None
) -> tuple[list[Entry], ViewState, KvModel]:
    """Run the commands as the backend does: decide on the view, append, fold, write KV."""
    state, model = ViewState(), KvModel()
    entries: list[Entry] = []
    for op, name, n in ops:
        seq = len(entries) + 1
        event = decide(state, seq, op, name, n)
        if event is None:
            continue
        entries.append((seq, event))
        model.apply(fold(state, seq, event))
        if after_each is not None:
            after_each(entries, state, model)
    return entries, state, model


def visible(state: ViewState) -> dict[str, Any]:
    """Everything a reader can observe: list, get (latest and pinned), mappings, audit."""
    listed = {}
    for name, record in state.secrets.items():
        readable = {v.revision: (v.sealed, v.kind) for v in record.live_versions()}
        if not readable and not record.deleted:
            continue  # `list` leaves fully destroyed secrets out
        latest = record.latest()
        listed[name] = {
            "deleted": record.deleted,
            "latest": None if latest is None else latest.revision,
            "readable": readable,
            "pinned": {r: record.version(r) is not None for r in readable},
            "updated_at": record.updated_at,
        }
    return {
        "secrets": listed,
        "mappings": state.mappings,
        "revision_of_seq": state.revision_of_seq,
        "destroyed": state.destroyed,
        "secrets_revision": state.secrets_revision,
        "state_revision": state.state_revision,
        "last_seq": state.last_seq,
    }


def refold_after_erasure(entries: list[Entry], model: KvModel) -> tuple[ViewState, KvModel]:
    """Fold the log as it reads after destroy: the erased puts are gaps (None)."""
    refolded_model = KvModel()
    state = ViewState()
    for seq, event in entries:
        refolded_model.apply(fold(state, seq, None if seq in model.erased_events else event))
    return state, refolded_model


def assert_refold_agrees(entries: list[Entry], live: ViewState, model: KvModel) -> None:
    refolded, refolded_model = refold_after_erasure(entries, model)
    assert visible(refolded) == visible(live)
    assert refolded_model.secrets == model.secrets
    assert refolded_model.state == model.state
    assert refolded_model.secrets_last == model.secrets_last


def test_a_refold_after_destroy_reports_the_destroyed_versions() -> None:
    """What `audit export` shows for a destroy: the versions, also once the put is erased."""
    entries, live, model = live_history([("put", "a", 0), ("put", "a", 0), ("destroy", "a", 0)])
    assert live.destroyed == {3: (1,)}
    assert model.erased_events == {1}
    refolded, _ = refold_after_erasure(entries, model)
    assert refolded.destroyed == {3: (1,)}
    assert_refold_agrees(entries, live, model)


def test_a_refold_of_an_undelete_whose_value_was_destroyed_later() -> None:
    """put, delete, undelete (a copy), destroy: deleted again, before and after a refold."""
    entries, live, model = live_history(
        [("put", "a", 0), ("delete", "a", 0), ("undelete", "a", 0), ("destroy", "a", 0)]
    )
    assert [type(event) for _, event in entries] == [
        SecretPut,
        SecretDeleted,
        SecretUndeleted,
        SecretDestroyed,
    ]
    assert live.destroyed == {4: (1, 3)}
    assert live.secrets["a"].deleted
    assert sorted(model.secrets) == [2]  # only the delete marker is left in the bucket
    assert_refold_agrees(entries, live, model)


# Each history is checked after every one of its (up to 40) commands: 150 histories are
# some 3,000 restarts, each refolded from the start (test_model_fold refolds 3,000 more
# histories at their end). No deadline: many folds per example, and a busy CI is slow.
@settings(max_examples=150, deadline=None)
@given(ops=commands)
def test_refolding_the_erased_log_reproduces_the_view_and_the_buckets(
    ops: list[tuple[str, str, int]],
) -> None:
    live_history(ops, after_each=assert_refold_agrees)  # a restart may come at any point


def kv_latest(model: KvModel, name: str) -> tuple[int, bytes] | None:
    """What a KV reader gets for `name`: its newest surviving entry, unless a delete marker."""
    entries = [(rev, entry) for rev, entry in model.secrets.items() if entry[0] == name]
    if not entries:
        return None
    revision, (_, value, kind) = max(entries)
    return None if kind == "DEL" else (revision, value)


@settings(max_examples=150, deadline=None)  # checked after every command, as above
@given(ops=commands)
def test_the_view_serves_the_latest_value_the_secrets_bucket_shows(
    ops: list[tuple[str, str, int]],
) -> None:
    """`get` from memory and `get` from the bucket (the original's way) agree, always."""

    def agree(_: list[Entry], state: ViewState, model: KvModel) -> None:
        for name in NAMES:
            record = state.secrets.get(name)
            latest = None if record is None else record.latest()
            served = None if latest is None else (latest.revision, latest.sealed)
            assert served == kv_latest(model, name)

    live_history(ops, after_each=agree)


def test_the_audit_export_records_a_fence_and_its_lifting() -> None:
    """What `audit export` says of an online rotation's marks: the run, the key, why it ended."""
    state = ViewState()
    events: list[Event] = [
        WritesFenced(new_key="XNEW", rotation="r1", admin_key="XADMIN", at=AT),
        FenceLifted(rotation="r1", reason="aborted", at=AT + 1),
    ]
    records = []
    for seq, event in numbered(list(events)):
        fold(state, seq, event)
        records.append(audit_record(LogEntry(seq, AT, event), state))
    assert [(r.type, r.rotation, r.new_key, r.reason) for r in records] == [
        ("writes_fenced", "r1", "XNEW", None),
        ("fence_lifted", "r1", None, "aborted"),
    ]
    assert records[0].admin_key == "XADMIN"
