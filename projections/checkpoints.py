"""Signed checkpoints in an audit export, and their offline verification.

An export is JSON Lines. With AUDIT_SIGNING_SEED (an account nkey seed, `SA…`, kept apart
from the backend's other keys) every record line is hashed into a running SHA-256 chain
over its exact bytes, and every `every` records a checkpoint line is written:

    {"type":"checkpoint","checkpoint":K,"records":N,"digest":"<hex>","final":false,
     "public_key":"A…","signature":"<hex>"}

The signature is Ed25519 over (K, N, digest, final). Anyone with the public key `A…`
can check a file without NATS or any secret (`secrets-nats-kv audit verify`): an edited,
removed, reordered or appended record makes the next checkpoint's digest differ, so the
record is named by position (exactly with one checkpoint per record, the default; else
by the window of records between two checkpoints); a file cut short ends without its
final checkpoint and is "verified up to checkpoint K". Vault's audit HMAC, which needs
the server's key to check, is not this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from secrets_nats_kv.errors import InvalidKey
from secrets_nats_kv.nkeys import SigningKey, verify

CHECKPOINT_TYPE = "checkpoint"
_START = hashlib.sha256(b"secrets-nats-kv/audit-chain/v1").hexdigest()


class Checkpoint(msgspec.Struct, frozen=True):
    type: str
    checkpoint: int
    records: int
    digest: str
    final: bool
    public_key: str
    signature: str


_decoder = msgspec.json.Decoder(Checkpoint)
_encoder = msgspec.json.Encoder()


def _link(digest: str, line: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(digest) + line).hexdigest()


def _signed(checkpoint: int, records: int, digest: str, final: bool) -> bytes:
    return (
        f"secrets-nats-kv audit checkpoint v1\n{checkpoint}\n{records}\n{digest}\n{final}".encode()
    )


class CheckpointWriter:
    """Wraps an export's lines: hashes each, and emits a signed checkpoint every `every`."""

    def __init__(self, signer: SigningKey, *, every: int = 1) -> None:
        self._signer = signer
        self._every = max(1, every)
        self._digest = _START
        self._records = 0
        self._checkpoints = 0

    def record(self, line: bytes) -> list[bytes]:
        """The lines to write for one record line: itself, then a checkpoint if one is due."""
        self._digest = _link(self._digest, line)
        self._records += 1
        if self._records % self._every == 0:
            return [line, self._checkpoint(final=False)]
        return [line]

    def final(self) -> bytes:
        """The last checkpoint: its absence is how a cut-short file is recognised."""
        return self._checkpoint(final=True)

    def _checkpoint(self, *, final: bool) -> bytes:
        self._checkpoints += 1
        message = _signed(self._checkpoints, self._records, self._digest, final)
        checkpoint = Checkpoint(
            type=CHECKPOINT_TYPE,
            checkpoint=self._checkpoints,
            records=self._records,
            digest=self._digest,
            final=final,
            public_key=self._signer.public_key,
            signature=self._signer.sign(message).hex(),
        )
        return _encoder.encode(checkpoint) + b"\n"


@dataclass(frozen=True)
class Verdict:
    """What `verify_export` found: `ok`, how far it verifies, and the first problem."""

    ok: bool
    records: int  # records covered by the last good checkpoint
    checkpoint: int  # the last good checkpoint (0: none)
    problem: str | None

    def summary(self) -> str:
        if self.ok:
            return (
                f"audit export verified: {self.records} records, "
                f"{self.checkpoint} signed checkpoints"
            )
        return (
            f"{self.problem}; verified up to checkpoint {self.checkpoint} ({self.records} records)"
        )


def verify_export(lines: Iterable[bytes], public_key: str) -> Verdict:
    """Check an export line by line against checkpoints signed by `public_key`."""
    digest, records, good, good_records = _START, 0, 0, 0
    since = 0  # first record after the last good checkpoint
    final_seen = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        checkpoint = _checkpoint_of(line)
        if checkpoint is None:
            if final_seen:
                return Verdict(
                    False,
                    good_records,
                    good,
                    f"record {records + 1} follows the final checkpoint (appended)",
                )
            digest = _link(digest, line)
            records += 1
            continue
        expected = good + 1
        problem = _check(checkpoint, public_key, expected, records, digest)
        if problem is not None:
            where = _where(good_records + 1, records)
            return Verdict(False, good_records, good, f"{where}: {problem} (line {number})")
        good, good_records, since = checkpoint.checkpoint, records, records + 1
        final_seen = checkpoint.final
    if not final_seen:
        if records > good_records:
            tail = _where(since, records)
            return Verdict(
                False,
                good_records,
                good,
                f"{tail} not covered by a checkpoint: appended, or the file is cut short",
            )
        return Verdict(
            False, good_records, good, "the export ends without its final checkpoint: cut short"
        )
    return Verdict(True, good_records, good, None)


def _checkpoint_of(line: bytes) -> Checkpoint | None:
    if b'"checkpoint"' not in line:
        return None
    try:
        checkpoint = _decoder.decode(line)
    except msgspec.DecodeError:
        return None
    return checkpoint if checkpoint.type == CHECKPOINT_TYPE else None


def _check(
    checkpoint: Checkpoint, public_key: str, expected: int, records: int, digest: str
) -> str | None:
    number = checkpoint.checkpoint
    message = _signed(number, checkpoint.records, checkpoint.digest, checkpoint.final)
    try:
        signature = bytes.fromhex(checkpoint.signature)
        signed = checkpoint.public_key == public_key and verify(public_key, message, signature)
    except (ValueError, InvalidKey):
        signed = False
    if not signed:
        return f"checkpoint {number} is not signed by {public_key}"
    if number != expected:
        return f"checkpoint {number} where {expected} was due (checkpoints removed or moved)"
    if checkpoint.records != records or checkpoint.digest != digest:
        return f"changed, removed, moved or added: checkpoint {number} does not match"
    return None


def _where(first: int, last: int) -> str:
    if last <= first:
        return f"record {first}"
    return f"records {first}-{last}"
