"""The online rotation's pure rules: the precheck, the patched destroy, the summary line."""

from __future__ import annotations

import string

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.rotation import BackendKeys, RotationRefused, RotationReport
from actors.rotation.access import retagged_id
from actors.rotation.precheck import check_backends
from actors.rotation.reseal import patched_destroy
from events.types import SecretDestroyed, decode_event, encode_event

NEW = "XNEW" + "A" * 52
# Strings as the regexes [A-Za-z0-9]{6,12} and [0-9a-f]{n} say, drawn as text and bytes
# (hypothesis's regex strategy, and one draw per hex digit, cost most of the run).
_ALNUM = string.ascii_letters + string.digits
_keys = st.sampled_from([None, NEW, "XOLD" + "B" * 52, "XOTHER" + "C" * 50])
_backends = st.lists(
    st.builds(BackendKeys, st.text(_ALNUM, min_size=6, max_size=12), _keys, _keys),
    max_size=6,
)


@given(_backends)
def test_the_precheck_refuses_iff_a_backend_lacks_the_new_key_and_names_the_first(
    backends: list[BackendKeys],
) -> None:
    lacking = [b for b in backends if NEW not in (b.current, b.next)]
    if not lacking:
        check_backends(backends, NEW)
        return
    with pytest.raises(RotationRefused) as refused:
        check_backends(backends, NEW)
    message = str(refused.value)
    assert f"backend instance {lacking[0].instance} does not hold the new key {NEW}" in message
    assert "\n" not in message


def test_keys_are_read_from_the_stats_public_keys() -> None:
    keys = BackendKeys.of("i1", {"encryption": "XA", "next_encryption": None, "transit": "XT"})
    assert (keys.instance, keys.current, keys.next) == ("i1", "XA", None)
    assert BackendKeys.of("i2", {"next_encryption": 7}).next is None  # not a key: ignored


_digest = st.binary(min_size=32, max_size=32).map(bytes.hex)


@given(
    st.lists(
        st.tuples(st.integers(1, 10_000), _digest), min_size=1, max_size=8, unique_by=lambda t: t[0]
    ),
    st.data(),
)
def test_a_patched_destroy_replaces_only_the_staged_digests_and_keeps_unknown_fields(
    erased: list[tuple[int, str]], data: st.DataObject
) -> None:
    seqs = tuple(seq for seq, _ in erased)
    event = SecretDestroyed(
        at=1.0,
        name="s",
        versions=(1,),
        erased_seqs=seqs,
        erased_digests=tuple(d for _, d in erased),
    )
    document = msgspec.json.decode(encode_event(event))
    document["field_of_a_later_version"] = {"kept": True}
    body = msgspec.json.encode(document)
    staged = data.draw(st.dictionaries(st.sampled_from(seqs), _digest))
    patched = patched_destroy(body, event, staged)
    again = decode_event(patched)
    assert isinstance(again, SecretDestroyed)
    assert again.erased_seqs == seqs
    assert again.erased_digests == tuple(staged.get(seq, d) for seq, d in erased)
    assert msgspec.json.decode(patched)["field_of_a_later_version"] == {"kept": True}


def test_the_online_summary_is_one_line_with_its_numbers() -> None:
    report = RotationReport(
        outcome="rotated",
        new_key=NEW,
        entries=120,
        events=110,
        resealed=100,
        seconds=2.0,
        fenced_seconds=0.25,
    )
    line = report.summary()
    assert line == (
        f"rotated the encryption key to {NEW} online: 100 values re-sealed, 120 entries, "
        "50 values/s, writes fenced for 0.25s, 2.00s in all"
    )


@given(st.binary(min_size=16, max_size=16).map(bytes.hex))
def test_a_retagged_batch_id_is_new_and_the_same_on_every_run(batch_id: str) -> None:
    assert retagged_id(batch_id, NEW) == retagged_id(batch_id, NEW) != batch_id
    assert retagged_id(batch_id, NEW) != retagged_id(batch_id, "XOTHER" + "D" * 50)


def test_a_resumed_run_says_it_finished_the_rotation() -> None:
    line = RotationReport(outcome="resumed", new_key=NEW, events=3, seconds=1.0).summary()
    assert line.startswith(f"finished the rotation of the encryption key to {NEW}: 3 events")


def test_the_summary_says_whether_the_anchor_it_wrote_is_signed() -> None:
    """Signed by AUDIT_SIGNING_SEED's key, unsigned, or (no anchor written) nothing."""
    signer = "A" + "B" * 55
    signed = RotationReport(outcome="rotated", new_key=NEW, anchor_signer=signer, note="n")
    assert signed.summary().endswith(f"; anchor signed by {signer} (n)")
    unsigned = RotationReport(outcome="rotated", new_key=NEW, anchor_signer="").summary()
    assert unsigned.endswith("; anchor unsigned (give AUDIT_SIGNING_SEED to sign it)")
    untouched = RotationReport(outcome="already rotated", new_key=NEW).summary()
    assert "anchor" not in untouched
