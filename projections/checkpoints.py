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

**Backend checkpoints.** A backend given the same AUDIT_SIGNING_SEED signs each anchor it
writes (`events/anchor.py`): (backend, log position, chain link, encryption key, time).
The export carries every kept one as a record of its own, together with the link the
exporter found at that position in the log it read (`log_link`, under `log_key`):

    {"type":"backend_checkpoint","backend":"nats-kv","seq":S,"link":"…","key":"X…",
     "at":T,"public_key":"A…","signature":"…","log_link":"…","log_key":"X…"}

`audit verify` checks each signature and that the log still holds, at S, the entry the
backend signed: someone holding the encryption key who later rewrites history (a
forged re-chain, an unwarranted `repair` dropping entries) cannot re-sign it, so the
rewrite shows as a mismatch at a named position. A checkpoint of a chain under another
encryption key (before a `rotate-key`, whose `key_rotated` record is in the export) is
counted as not comparable, not as a failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from events.anchor import Anchored, verify_checkpoint
from secrets_nats_kv.errors import InvalidKey
from secrets_nats_kv.nkeys import SigningKey, verify

CHECKPOINT_TYPE = "checkpoint"
BACKEND_CHECKPOINT_TYPE = "backend_checkpoint"
_START = hashlib.sha256(b"secrets-nats-kv/audit-chain/v1").hexdigest()


class Checkpoint(msgspec.Struct, frozen=True):
    type: str
    checkpoint: int
    records: int
    digest: str
    final: bool
    public_key: str
    signature: str


class BackendCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A backend's signed anchor, and what the exporter's log holds at its position."""

    type: str = BACKEND_CHECKPOINT_TYPE
    backend: str
    seq: int
    link: str
    key: str
    at: float
    public_key: str
    signature: str
    log_link: str  # the log's link at `seq` ("" if the log does not reach it)
    log_key: str  # the encryption key the exporter read the log with

    @classmethod
    def of(cls, backend: str, anchored: Anchored, log_link: str, log_key: str) -> BackendCheckpoint:
        return cls(
            backend=backend,
            seq=anchored.seq,
            link=anchored.link,
            key=anchored.key,
            at=anchored.at,
            public_key=anchored.signer,
            signature=anchored.signature,
            log_link=log_link,
            log_key=log_key,
        )

    def anchored(self) -> Anchored:
        return Anchored(
            seq=self.seq,
            link=self.link,
            at=self.at,
            key=self.key,
            signer=self.public_key,
            signature=self.signature,
        )


_decoder = msgspec.json.Decoder(Checkpoint)
_backend_decoder = msgspec.json.Decoder(BackendCheckpoint)
_encoder = msgspec.json.Encoder()


def backend_checkpoint_line(checkpoint: BackendCheckpoint) -> bytes:
    return _encoder.encode(checkpoint) + b"\n"


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
    backend_matched: int = 0  # backend checkpoints the log still agrees with
    backend_rekeyed: int = 0  # backend checkpoints of a chain under an earlier key

    def summary(self) -> str:
        if self.ok:
            backend = ""
            if self.backend_matched or self.backend_rekeyed:
                backend = f", {self.backend_matched} backend checkpoints match the log"
                if self.backend_rekeyed:
                    backend += f" ({self.backend_rekeyed} before a key rotation, not comparable)"
            return (
                f"audit export verified: {self.records} records, "
                f"{self.checkpoint} signed checkpoints{backend}"
            )
        return (
            f"{self.problem}; verified up to checkpoint {self.checkpoint} ({self.records} records)"
        )


def verify_export(lines: Iterable[bytes], public_key: str) -> Verdict:
    """Check an export line by line against checkpoints signed by `public_key`."""
    digest, records, good, good_records = _START, 0, 0, 0
    since = 0  # first record after the last good checkpoint
    final_seen = False
    matched = rekeyed = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        checkpoint = _checkpoint_of(line)
        if checkpoint is None:
            backend = _backend_checkpoint_of(line)
            if backend is not None:
                problem = _check_backend(backend, public_key)
                if problem is not None:
                    return Verdict(False, good_records, good, f"{problem} (line {number})")
                if backend.key == backend.log_key:
                    matched += 1
                else:
                    rekeyed += 1
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
    return Verdict(True, good_records, good, None, matched, rekeyed)


def _backend_checkpoint_of(line: bytes) -> BackendCheckpoint | None:
    if BACKEND_CHECKPOINT_TYPE.encode() not in line:
        return None
    try:
        found = _backend_decoder.decode(line)
    except msgspec.DecodeError:
        return None
    return found if found.type == BACKEND_CHECKPOINT_TYPE else None


def _check_backend(checkpoint: BackendCheckpoint, public_key: str) -> str | None:
    """Why a backend checkpoint fails: not signed by `public_key`, or the log differs."""
    where = f"backend checkpoint at log entry #{checkpoint.seq}"
    try:
        signed = verify_checkpoint(checkpoint.backend, checkpoint.anchored(), public_key)
    except InvalidKey:
        signed = False
    if not signed:
        return f"{where} is not signed by {public_key}"
    if checkpoint.key != checkpoint.log_key:
        return None  # a chain under an earlier key (rotate-key): not comparable
    if not checkpoint.log_link:
        return f"{where}: the log no longer reaches that entry (history cut after it was signed)"
    if checkpoint.log_link != checkpoint.link:
        return (
            f"{where}: the log holds another entry there than the one the backend signed "
            "(history rewritten after it was signed)"
        )
    return None


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
