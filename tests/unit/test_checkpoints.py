"""Signed audit checkpoints, checked offline with nothing but the public key.

An export is built the way `audit export` writes it, then changed as someone holding
the file could: a record edited, removed, moved or added, or the file cut short. The
verifier must pass the untouched file, and name the first changed record's position.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections.checkpoints import CheckpointWriter, verify_export
from secrets_nats_kv.nkeys import Role, SigningKey

SIGNER = SigningKey.generate(Role.ACCOUNT)


def export(records: list[bytes], every: int = 1) -> list[bytes]:
    writer = CheckpointWriter(SIGNER, every=every)
    lines: list[bytes] = []
    for record in records:
        lines += writer.record(record)
    return [*lines, writer.final()]


def record(i: int) -> bytes:
    return json.dumps({"seq": i, "type": "secret_put", "secret": f"s{i}"}).encode() + b"\n"


def positions(lines: list[bytes]) -> list[int]:
    """Line index of each record (not checkpoint) line."""
    return [i for i, line in enumerate(lines) if b'"checkpoint"' not in line]


RECORDS = [record(i) for i in range(1, 9)]


def test_an_untouched_export_verifies() -> None:
    verdict = verify_export(export(RECORDS), SIGNER.public_key)
    assert verdict.ok
    assert (verdict.records, verdict.checkpoint) == (8, 9)
    assert "verified: 8 records" in verdict.summary()


def test_another_key_verifies_nothing() -> None:
    other = SigningKey.generate(Role.ACCOUNT).public_key
    verdict = verify_export(export(RECORDS), other)
    assert not verdict.ok
    assert f"not signed by {other}" in (verdict.problem or "")
    assert verdict.checkpoint == 0


records_st = st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True).map(
    lambda ids: [record(i) for i in ids]
)


@settings(max_examples=300, deadline=None)
@given(records_st, st.sampled_from(["edit", "remove", "swap", "insert"]), st.data())
def test_any_single_change_is_named_by_position(
    records: list[bytes], how: str, data: st.DataObject
) -> None:
    lines = export(records)
    at = positions(lines)
    k = data.draw(st.integers(0, len(records) - 1))  # the record changed (0-based)
    if how == "edit":
        lines[at[k]] = lines[at[k]].replace(b"secret_put", b"secret_del")
    elif how == "remove":
        del lines[at[k]]
    elif how == "insert":
        lines.insert(at[k], record(99_999))
    else:
        if len(records) < 2:
            return
        j = data.draw(st.integers(0, len(records) - 1).filter(lambda j: j != k))
        lines[at[k]], lines[at[j]] = lines[at[j]], lines[at[k]]
        k = min(k, j)
    verdict = verify_export(lines, SIGNER.public_key)
    assert not verdict.ok
    assert f"record {k + 1}" in (verdict.problem or "") or f"records {k + 1}-" in (
        verdict.problem or ""
    )
    assert verdict.checkpoint == k  # everything before it still verifies


@settings(max_examples=100, deadline=None)
@given(records_st, st.data())
def test_a_cut_short_export_is_verified_up_to_a_checkpoint(
    records: list[bytes], data: st.DataObject
) -> None:
    lines = export(records)
    keep = data.draw(st.integers(0, len(lines) - 1))  # at least the final line goes
    verdict = verify_export(lines[:keep], SIGNER.public_key)
    assert not verdict.ok
    assert "verified up to checkpoint" in verdict.summary()
    assert verdict.records <= len(records)


def test_a_record_appended_after_the_final_checkpoint_is_named() -> None:
    lines = [*export(RECORDS), record(9)]
    verdict = verify_export(lines, SIGNER.public_key)
    assert not verdict.ok
    assert "record 9 follows the final checkpoint" in (verdict.problem or "")


@pytest.mark.parametrize("every", [3, 5])
def test_sparser_checkpoints_name_the_window(every: int) -> None:
    lines = export(RECORDS, every=every)
    assert verify_export(lines, SIGNER.public_key).ok
    at = positions(lines)
    lines[at[6]] = record(70)  # record 7
    verdict = verify_export(lines, SIGNER.public_key)
    assert not verdict.ok
    first = (6 // every) * every + 1
    assert f"records {first}-" in (verdict.problem or "")
