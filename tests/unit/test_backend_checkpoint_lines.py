"""Backend checkpoints in an export: each one compared with the link the log has there.

A backend signs (backend, position, link, key, time) with the audit key; the exporter
writes it with the link it found at that position. For every position and link, the
verifier passes a checkpoint the log agrees with, names the position of one it does not
(another link, or a log that no longer reaches it), refuses a signature that is not the
audit key's or that covers other fields, and counts one of a chain under an earlier
encryption key (a rotation) as not comparable.
"""

from __future__ import annotations

import hashlib

from hypothesis import assume, given
from hypothesis import strategies as st

from events.anchor import Anchored, checkpoint_message
from projections.checkpoints import (
    BackendCheckpoint,
    CheckpointWriter,
    backend_checkpoint_line,
    verify_export,
)
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey

SIGNER = SigningKey.generate(Role.ACCOUNT)
OTHER = SigningKey.generate(Role.ACCOUNT)
KEY = XKey.generate().public_key
NEW_KEY = XKey.generate().public_key


def signed(seq: int, link: str, signer: SigningKey = SIGNER, at: float = 1700000000.5) -> Anchored:
    signature = signer.sign(checkpoint_message("nats-kv", seq, link, KEY, at)).hex()
    return Anchored(
        seq=seq, link=link, at=at, key=KEY, signer=signer.public_key, signature=signature
    )


def exported(checkpoint: BackendCheckpoint) -> list[bytes]:
    writer = CheckpointWriter(SIGNER)
    lines = writer.record(b'{"seq":1,"type":"secret_put","secret":"db"}\n')
    lines += writer.record(backend_checkpoint_line(checkpoint))
    return [*lines, writer.final()]


links = st.integers(min_value=0).map(lambda n: hashlib.sha256(str(n).encode()).hexdigest())
seqs = st.integers(min_value=1, max_value=2**40)


@given(seqs, links)
def test_a_checkpoint_the_log_agrees_with_passes(seq: int, link: str) -> None:
    verdict = verify_export(
        exported(BackendCheckpoint.of("nats-kv", signed(seq, link), link, KEY)), SIGNER.public_key
    )
    assert verdict.ok, verdict.problem
    assert verdict.backend_matched == 1
    assert "1 backend checkpoints match the log" in verdict.summary()


@given(seqs, links, links)
def test_another_link_at_the_position_is_named(seq: int, link: str, found: str) -> None:
    assume(found != link)
    line = BackendCheckpoint.of("nats-kv", signed(seq, link), found, KEY)
    verdict = verify_export(exported(line), SIGNER.public_key)
    assert not verdict.ok
    assert f"backend checkpoint at log entry #{seq}: the log holds another entry" in str(
        verdict.problem
    )


@given(seqs, links)
def test_a_log_that_no_longer_reaches_the_position_is_named(seq: int, link: str) -> None:
    verdict = verify_export(
        exported(BackendCheckpoint.of("nats-kv", signed(seq, link), "", KEY)), SIGNER.public_key
    )
    assert not verdict.ok
    assert f"#{seq}: the log no longer reaches that entry" in str(verdict.problem)


def test_a_signature_not_the_audit_keys_or_over_other_fields_is_refused() -> None:
    link = "ab" * 32
    stranger = BackendCheckpoint.of("nats-kv", signed(5, link, OTHER), link, KEY)
    verdict = verify_export(exported(stranger), SIGNER.public_key)
    assert f"backend checkpoint at log entry #5 is not signed by {SIGNER.public_key}" in str(
        verdict.problem
    )
    genuine = signed(5, link)
    for moved in (
        Anchored(
            seq=6,
            link=link,
            at=genuine.at,
            key=KEY,
            signer=genuine.signer,
            signature=genuine.signature,
        ),
        Anchored(
            seq=5,
            link=link,
            at=genuine.at + 1,
            key=KEY,
            signer=genuine.signer,
            signature=genuine.signature,
        ),
    ):
        verdict = verify_export(
            exported(BackendCheckpoint.of("nats-kv", moved, link, KEY)), SIGNER.public_key
        )
        assert "is not signed by" in str(verdict.problem)


def test_a_checkpoint_of_a_chain_under_an_earlier_key_is_not_comparable() -> None:
    line = BackendCheckpoint.of("nats-kv", signed(3, "cd" * 32), "", NEW_KEY)
    verdict = verify_export(exported(line), SIGNER.public_key)
    assert verdict.ok, verdict.problem
    assert (verdict.backend_matched, verdict.backend_rekeyed) == (0, 1)
    assert "before a key rotation, not comparable" in verdict.summary()
