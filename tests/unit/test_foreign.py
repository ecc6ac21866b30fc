"""The checks every writer makes on the buckets before writing (projections/foreign.py)."""

from __future__ import annotations

import pytest

from events.types import SecretDeleted, SecretDestroyed, SecretPut
from projections.foreign import (
    IMPORT_DONE,
    IMPORT_REPLACING,
    BucketFound,
    UnexplainedEntries,
    check_explained,
    check_layout,
    expected_at,
)
from projections.state import ViewState, fold


def test_the_originals_bucket_and_a_half_imported_one_are_refused_naming_import() -> None:
    original = BucketFound("WASMCLOUD_SECRETS", exists=True, deny_delete=True, messages=3)
    with pytest.raises(UnexplainedEntries, match="secrets-nats-kv import"):
        check_layout(original)
    half = BucketFound("WASMCLOUD_SECRETS", exists=True, marker=IMPORT_REPLACING, last_seq=9)
    with pytest.raises(UnexplainedEntries, match="unfinished import"):
        check_layout(half)
    # An empty bucket the KV API made, and one an import finished, are fine.
    check_layout(BucketFound("B", exists=True, deny_delete=True))
    check_layout(BucketFound("B", exists=True, marker=IMPORT_DONE, messages=5, last_seq=5))


@pytest.mark.parametrize("last", [0, 4, 5])
def test_a_bucket_is_explained_up_to_the_revision_the_log_implies(last: int) -> None:
    check_explained(BucketFound("B", exists=True, messages=last, last_seq=last), 5)


def test_a_bucket_past_the_log_is_refused() -> None:
    with pytest.raises(UnexplainedEntries, match="explains only 5"):
        check_explained(BucketFound("B", exists=True, messages=6, last_seq=6), 5)


def test_expected_at_names_what_the_log_puts_at_each_revision() -> None:
    state = ViewState()
    fold(state, 1, SecretPut(at=0.0, name="a", sealed=b"one"))
    fold(state, 2, SecretPut(at=0.0, name="a", sealed=b"two"))
    fold(state, 3, SecretDeleted(at=0.0, name="a"))
    fold(state, 4, SecretPut(at=0.0, name="b", sealed=b"three"))
    fold(state, 5, SecretDestroyed(at=0.0, name="b", versions=(4,)))
    assert expected_at(state, 1) == ("a", b"one", None)
    assert expected_at(state, 2) == ("a", b"two", None)
    assert expected_at(state, 3) == ("a", b"", "DEL")
    assert expected_at(state, 4) is None  # destroyed: nothing readable may be there
    assert expected_at(state, 9) is None
