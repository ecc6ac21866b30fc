"""The import plan, folded, reproduces the original's buckets revision for revision.

A model of the original's secrets bucket (puts, stock deletes and purges on a few keys,
with a per-key history limit and purge rollups, as JetStream keeps them) and of its state
bucket (history 1) gives what `import` reads; the property: folding the planned events
serves every surviving put at its own revision with its own bytes, nothing at a revision
the bucket lost, deletions as they were, the next put one past the bucket's last
revision, mappings exactly as held, and every KV write at the revision it had.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.types import OriginalImported
from projections.import_plan import (
    ImportPlan,
    ImportRefused,
    SecretEntry,
    StateEntry,
    plan_import,
)
from projections.state import (
    FillErasedRevision,
    FillStateRevision,
    MarkSecretDeleted,
    PutMappingEntry,
    PutSecretEntry,
    ViewState,
    fold,
)

KEYS = ("a", "b", "c/d", "e.f")
ENTITIES = ("MAAA", "MBBB")

operations = st.lists(
    st.tuples(st.sampled_from(("put", "put", "put", "DEL", "PURGE")), st.sampled_from(KEYS)),
    max_size=60,
)
mapping_writes = st.lists(
    st.tuples(
        st.sampled_from(ENTITIES), st.lists(st.sampled_from(KEYS), unique=True), st.booleans()
    ),
    max_size=8,
)


def original_secrets(ops: list[tuple[str, str]], history: int) -> list[SecretEntry]:
    """What the bucket still holds after `ops`: per-key history limit, purge rollups."""
    kept: dict[str, list[SecretEntry]] = {}
    for revision, (op, key) in enumerate(ops, start=1):
        if op == "put":
            entry = SecretEntry(revision, key, float(revision), None, b"v%d" % revision, "string")
        else:
            entry = SecretEntry(revision, key, float(revision), op)
        entries = kept.setdefault(key, [])
        if op == "PURGE":
            entries.clear()
        entries.append(entry)
        del entries[:-history]
    return sorted((e for es in kept.values() for e in es), key=lambda e: e.revision)


def original_state(writes: list[tuple[str, list[str], bool]]) -> list[StateEntry]:
    kept: dict[str, StateEntry] = {}
    for revision, (entity, names, deleted) in enumerate(writes, start=1):
        value = b"" if deleted else msgspec.json.encode(names)
        kept[entity] = StateEntry(revision, entity, 0.0, "DEL" if deleted else None, value)
    return sorted(kept.values(), key=lambda e: e.revision)


@settings(max_examples=300, deadline=None)
@given(ops=operations, writes=mapping_writes, history=st.integers(1, 5), tail=st.integers(0, 3))
def test_the_folded_plan_reproduces_every_revision(
    ops: list[tuple[str, str]],
    writes: list[tuple[str, list[str], bool]],
    history: int,
    tail: int,
) -> None:
    secrets = original_secrets(ops, history)
    state_entries = original_state(writes)
    last = len(ops) + tail  # a stream's last sequence may be past its last message
    plan = plan_import(
        secrets_bucket="S",
        state_bucket="M",
        secrets=secrets,
        secrets_revision=last,
        state=state_entries,
        state_revision=len(writes),
    )
    state = ViewState()
    record = plan.record(at=0.0, admin_key="XADMIN")
    assert isinstance(record, OriginalImported)
    assert fold(state, 1, record) == []
    written: dict[int, tuple[str, bytes | None]] = {}
    state_written: dict[int, object] = {}
    for seq, event in enumerate(plan.events, start=2):
        for effect in fold(state, seq, event):
            match effect:
                case PutSecretEntry(key, revision, sealed, _):
                    written[revision] = (key, sealed)
                case MarkSecretDeleted(key, revision, _):
                    written[revision] = (key, None)
                case FillErasedRevision(revision):
                    written[revision] = ("", None)
                case PutMappingEntry(entity, revision, names):
                    state_written[revision] = (entity, names)
                case FillStateRevision(revision):
                    state_written[revision] = None
    # Every KV write lands at its own revision: 1..last, each once.
    assert sorted(written) == list(range(1, last + 1))
    assert sorted(state_written) == list(range(1, len(writes) + 1))
    assert state.secrets_revision == last  # the next put is last + 1
    present = {e.revision: e for e in secrets}
    for revision, (key, sealed) in written.items():
        entry = present.get(revision)
        if entry is None:
            assert key == ""  # lost by the original: a placeholder, nothing readable
        else:
            assert key == entry.key
            assert sealed == (entry.sealed if entry.operation is None else None)
    for key in {e.key for e in secrets}:
        newest = [e for e in secrets if e.key == key][-1]
        record_ = state.secrets[key]
        assert record_.deleted == (newest.operation is not None)
        served = {v.revision for v in record_.live_versions()}
        assert served == {e.revision for e in secrets if e.key == key and e.operation is None}
        if not record_.deleted:
            for revision in served:
                version = record_.version(revision)
                assert version is not None
                assert version.sealed == present[revision].sealed
    dropped = set(range(1, last + 1)) - set(present)
    for record_ in state.secrets.values():
        assert not dropped & set(record_.versions)
    held = {e.key: set(msgspec.json.decode(e.value)) for e in state_entries if e.operation is None}
    assert state.mappings == held
    assert plan.counts.versions == sum(1 for e in secrets if e.operation is None)
    assert plan.counts.mappings == len(held)


def _plan(secrets: list[SecretEntry], last: int) -> ImportPlan:
    return plan_import(
        secrets_bucket="S",
        state_bucket="M",
        secrets=secrets,
        secrets_revision=last,
        state=[],
        state_revision=0,
    )


def test_the_plan_is_deterministic_and_its_digest_names_its_content() -> None:
    secrets = original_secrets([("put", "a"), ("put", "b"), ("DEL", "a")], 64)
    first, again = _plan(secrets, 3), _plan(secrets, 3)
    assert first.digest == again.digest
    assert first.matches(again.record(at=1.0, admin_key="X"))
    moved = _plan(secrets, 4)  # the bucket moved on: another plan
    assert not first.matches(moved.record(at=1.0, admin_key="X"))


@pytest.mark.parametrize(
    ("key", "value"),
    [("_secrets-nats-kv_erased", None), ("bad key", None), ("M1", b"{not json")],
)
def test_what_cannot_be_imported_is_refused_in_words(key: str, value: bytes | None) -> None:
    secrets = [SecretEntry(1, key, 0.0, None, b"x")] if value is None else []
    state = [StateEntry(1, key, 0.0, None, value)] if value is not None else []
    with pytest.raises(ImportRefused, match="revision 1"):
        plan_import(
            secrets_bucket="S",
            state_bucket="M",
            secrets=secrets,
            secrets_revision=1,
            state=state,
            state_revision=len(state),
        )
