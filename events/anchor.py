"""The anchor: where the log's chain stood, kept outside the log.

The chain proves each entry follows the one before; it cannot show that entries were
cut from the *end*, or that the whole stream was replaced by an earlier part of itself.
So after every append a backend records (position, link) in a stream of its own,
`SECRETS_{name}_anchor` (one message kept, no deletes or purges), tagged by the barrier
over (stream, subject, the message's own sequence, value): an old anchor published
again sits at another sequence and does not verify. A backend refuses to start on a log
that ends before its anchor or differs from it at the anchored position; each running
backend's memory is a second anchor (`LiveView`).

What this does not stop: someone able to delete *both* streams and restore an earlier,
consistent copy of each, while no backend is running. Signed audit checkpoints kept
elsewhere are the answer to that; NATS permissions are the first wall.

**Backend checkpoints.** Given AUDIT_SIGNING_SEED (an account seed, `SA…`, apart from
the encryption key), a backend signs every anchor it writes: Ed25519 over (backend,
position, chain link, the encryption key's public key, time). It signs with each anchor
update, i.e. once per admin write: writes are admin-rate, a signature costs well under a
millisecond, it rides the anchor message already written (no extra message, no other
subject to permit), and each one names the exact head after a write, so nothing later
can rewrite any entry up to it unseen. The stream keeps the last `ANCHOR_HISTORY`
anchors (not only the newest) and denies deletes and purges, so the signed ones survive
a later, unsigned anchor written by someone holding only the encryption key. Someone
with that key can re-chain a log and write a fresh anchor; they cannot sign one, so
`audit export` shows the earlier signed (position, link) beside the link the log has
there now, and `audit verify` names the mismatch (`projections/checkpoints.py`).
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from secrets_nats_kv import streams
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import (
    EXPECTED_LAST_SEQUENCE_HEADER,
    WRONG_LAST_SEQUENCE,
    stored_message,
    stream_state,
)
from secrets_nats_kv.nats.jetstream import to_backend_error as convert
from secrets_nats_kv.nats.provisioning import (
    ensure_stream,
)
from secrets_nats_kv.nkeys import SigningKey, verify

log = logging.getLogger(__name__)

_ATTEMPTS = 10
_ELECTION_S = 20.0
ANCHOR_HISTORY = 4096  # anchors kept: the newest is the anchor, the rest signed history
_CHECKPOINT_V1 = "secrets-nats-kv backend checkpoint v1"


# The anchor's names as its importers spell them; built in `secrets_nats_kv.streams`.
anchor_stream_name = streams.anchor_stream
anchor_subject = streams.anchor_subject


class Anchored(msgspec.Struct, frozen=True, omit_defaults=True):
    """The log's last anchored position and the chain link there; with a signer, signed.

    `key` is the encryption key's public key (the chain's links are keyed by it: after
    `rotate-key` a checkpoint of the old chain is not comparable with the new one).
    """

    seq: int
    link: str
    at: float = 0.0
    key: str = ""
    signer: str = ""  # the AUDIT_SIGNING_SEED's public key (A…), if signed
    signature: str = ""  # hex Ed25519 over `checkpoint_message`


def checkpoint_message(backend: str, seq: int, link: str, key: str, at: float) -> bytes:
    """What a backend checkpoint's signature covers (also checked by `audit verify`)."""
    return f"{_CHECKPOINT_V1}\n{backend}\n{seq}\n{link}\n{key}\n{at:.6f}".encode()


def verify_checkpoint(backend: str, anchored: Anchored, public_key: str) -> bool:
    """Whether `anchored` is signed by `public_key` (bad key text raises `InvalidKey`)."""
    if anchored.signer != public_key or not anchored.signature:
        return False
    try:
        signature = bytes.fromhex(anchored.signature)
    except ValueError:
        return False
    message = checkpoint_message(backend, anchored.seq, anchored.link, anchored.key, anchored.at)
    return verify(public_key, message, signature)


def anchor_said(signer: str | None) -> str:
    """What the CLI line says of the anchor a rewrite (rotate-key, repair) wrote: signed
    by AUDIT_SIGNING_SEED's key, or unsigned (`audit verify` then has no checkpoint at the
    rewritten log's position until a backend with the seed writes the next anchor)."""
    if signer is None:
        return ""  # no anchor written by this run (dry run, nothing to do)
    if signer:
        return f"; anchor signed by {signer}"
    return "; anchor unsigned (give AUDIT_SIGNING_SEED to sign it)"


_decoder = msgspec.json.Decoder(Anchored)


class AnchorForged(StorageError):
    def __init__(self) -> None:
        super().__init__(
            "event log anchor",
            "the anchor is not tagged by this ENCRYPTION_XKEY_SEED (forged, or a wrong key)",
        )


class Anchor:
    """Read and move forward the anchor of one backend's log."""

    def __init__(
        self,
        nc: NATS,
        *,
        backend_name: str,
        barrier: Barrier,
        replicas: int = 1,
        timeout: float = 5.0,
        signer: SigningKey | None = None,
    ) -> None:
        self._nc = nc
        self._signer = signer
        self._backend = backend_name
        self._js = nc.jetstream(timeout=timeout)
        self._barrier = barrier
        self._timeout = timeout
        self.stream = anchor_stream_name(backend_name)
        self.subject = anchor_subject(backend_name)
        self.replicas = replicas

    async def ensure(self) -> None:
        config = api.StreamConfig(
            name=self.stream,
            description="secrets-nats-kv: where the event log's chain stood",
            subjects=[self.subject],
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            max_msgs_per_subject=ANCHOR_HISTORY,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
        )
        await ensure_stream(self._nc, config, self._timeout)

    async def read(self) -> Anchored | None:
        """The anchor, verified; None if there is none yet; `AnchorForged` if not ours.

        A stream just created on a cluster has no leader for a moment: reads that time
        out then are tried again, for up to `_ELECTION_S` seconds.
        """
        delay, deadline = 0.1, time.monotonic() + _ELECTION_S
        while True:
            try:
                msg = await self._js.get_last_msg(self.stream, self.subject)
                break
            except nats.js.errors.NotFoundError:
                return None
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() > deadline:
                    raise convert("read anchor", exc) from None
            except nats.errors.Error as exc:
                raise convert("read anchor", exc) from None
            await anyio.sleep(delay)  # waiting out a leader election, bounded
            delay = min(delay * 2, 1.0)
        found = self._ours(msg.seq or 0, msg)
        if found is None:
            raise AnchorForged()
        return found

    async def read_past_strangers(self) -> Anchored | None:
        """The newest anchor this key tagged, passing over strangers' messages above it.

        On an open bus anyone can publish on the anchor subject. A stranger's message on
        top hides nothing: it cannot verify (the tag covers its own sequence, so even a
        genuine anchor published again does not), and the anchors kept below it are the
        newest genuine ones (the stream drops the oldest first). So the backend reads
        past it, warns once, and its next write puts a genuine anchor back on top; only
        when no kept anchor verifies at all (a wrong key, or a flood that pushed every
        genuine one out) is the anchor `AnchorForged`, and the start refused.
        """
        try:
            return await self.read()
        except AnchorForged:
            pass
        state = await stream_state(self._nc, self.stream, self._timeout)
        passed = 0
        for position in range(state.last_seq, state.first_seq - 1, -1):
            msg = await stored_message(self._nc, self.stream, position, self._timeout)
            if msg is None or msg.subject != self.subject:
                continue
            found = self._ours(position, msg)
            if found is None and self._claims_another_key(msg):
                # Another key's anchor above any of ours: the log was rotated away from
                # this key (or someone says so). Not passed over: the start is refused,
                # and the log itself is judged first (a wrong key is the likelier news).
                raise AnchorForged()
            if found is not None:
                log.warning(
                    "messages on the anchor subject not tagged by this key were passed "
                    "over (someone publishes there: see the permissions profile)",
                    extra={"stream": self.stream, "passed": passed, "anchor": found.seq},
                )
                return found
            passed += 1
        raise AnchorForged()

    def _claims_another_key(self, msg: api.RawStreamMsg) -> bool:
        try:
            claimed = _decoder.decode(msg.data or b"").key
        except msgspec.DecodeError:
            return False
        return bool(claimed) and not self._barrier.holds(claimed)

    def _ours(self, position: int, msg: api.RawStreamMsg) -> Anchored | None:
        """The anchor stored at `position`, if this key tagged it there; else None."""
        data = msg.data or b""
        tag = (msg.headers or {}).get(KV_TAG_HEADER)
        if not self._barrier.verify_kv(self.stream, self.subject, position, data, tag):
            return None
        try:
            return _decoder.decode(data)
        except msgspec.DecodeError:
            return None

    async def advance(self, seq: int, link: str) -> None:
        """Record (seq, link) unless the anchor is already at or past `seq`."""
        for _ in range(_ATTEMPTS):
            current = await self.read_past_strangers()
            if current is not None and current.seq >= seq:
                return
            if await self._write(seq, link):
                return
        raise StorageError("anchor", "kept changing under this write")

    async def reset(self, seq: int, link: str) -> None:
        """Record (seq, link) whatever is there (a rewritten log: rotate-key, repair)."""
        for _ in range(_ATTEMPTS):
            if await self._write(seq, link):
                return
        raise StorageError("anchor", "kept changing under this write")

    async def history(self, signed_by: str | None = None) -> list[Anchored]:
        """Every kept anchor this backend's key tagged, or (`signed_by`) that this audit
        key signed: those of a chain before a `rotate-key` carry the old key's tag.
        Oldest first (for `audit export`)."""
        state = await stream_state(self._nc, self.stream, self._timeout)
        found: list[Anchored] = []
        for position in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await stored_message(self._nc, self.stream, position, self._timeout)
            if msg is None or msg.subject != self.subject:
                continue
            data = msg.data or b""
            tag = (msg.headers or {}).get(KV_TAG_HEADER)
            try:
                anchored = _decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if self._barrier.verify_kv(self.stream, self.subject, position, data, tag) or (
                signed_by is not None and verify_checkpoint(self._backend, anchored, signed_by)
            ):
                found.append(anchored)  # anything else is a stranger's: left out
        return found

    def _anchored(self, seq: int, link: str) -> Anchored:
        at = time.time()
        key = self._barrier.public_key
        if self._signer is None:
            return Anchored(seq=seq, link=link, at=at, key=key)
        message = checkpoint_message(self._backend, seq, link, key, at)
        return Anchored(
            seq=seq,
            link=link,
            at=at,
            key=key,
            signer=self._signer.public_key,
            signature=self._signer.sign(message).hex(),
        )

    async def _write(self, seq: int, link: str) -> bool:
        """One pinned write; False if another writer took the position first."""
        last = (await stream_state(self._nc, self.stream, self._timeout)).last_seq
        value = msgspec.json.encode(self._anchored(seq, link))
        headers = {
            KV_TAG_HEADER: self._barrier.kv_tag(self.stream, self.subject, last + 1, value),
            EXPECTED_LAST_SEQUENCE_HEADER: str(last),
        }
        try:
            await self._js.publish(self.subject, value, stream=self.stream, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return False
            raise convert("write anchor", exc) from None
        except nats.errors.Error as exc:
            raise convert("write anchor", exc) from None
        return True
