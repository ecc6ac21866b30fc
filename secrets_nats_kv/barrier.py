"""The security core: one object, built from the encryption key, that seals, opens and tags.

Like OpenBao's barrier ("a single point of encryption, decryption and checksum
verification"), everything the backend stores passes through a `Barrier`:

- values are sealed by the encryption xkey to itself (xkv1), and opened the same way;
- every log entry carries an *entry tag*, HMAC-SHA256 over (position, body): it proves
  the entry was written by a holder of the key for exactly that position;
- every log entry carries a *chain link*, HMAC-SHA256 over (position, SHA-256 of the
  body, the previous accepted entry's link): a deleted, reordered, replaced or truncated
  entry breaks the chain at a known position. The link commits to a digest of the body,
  so a `destroy` that erases the bytes leaves what they were (their digest, recorded in
  the tagged `SecretDestroyed`) for a reader to carry the chain across the gap;
- every KV entry the backend writes carries a tag over (bucket, key, revision, value).

Each use has its own key derived from the encryption key (`XKey.derive_key`), so a tag
of one kind is never valid as another. Nothing here does I/O; no key is ever shown.
"""

from __future__ import annotations

import hashlib
import hmac

from .xkeys import SealBox, XKey

ENTRY_TAG_HEADER = "Secrets-Event-Tag"
CHAIN_HEADER = "Secrets-Event-Chain"
PREV_HEADER = "Secrets-Event-Prev"  # the link this entry follows (what `repair` relinks to)
KV_TAG_HEADER = "Secrets-Entry-Tag"

GENESIS = "0" * 64  # the link "before" entry 1 of a log
_ENTRY_CONTEXT = b"secrets-nats-kv/event-tag/v1"
_CHAIN_CONTEXT = b"secrets-nats-kv/event-chain/v1"
_KV_CONTEXT = b"secrets-nats-kv/kv-tag/v1"
_ERASED = b"erased"  # what a rewritten log (rotate-key, repair) links an erased position to


def digest(body: bytes) -> str:
    """The SHA-256 of stored bytes, as the chain and `SecretDestroyed` record it."""
    return hashlib.sha256(body).hexdigest()


class Barrier:
    """Seal/open values and tag/verify/chain entries with keys derived from one xkey."""

    __slots__ = ("_box", "_chain", "_entry", "_kv", "public_key")

    def __init__(self, encryption: XKey) -> None:
        self.public_key = encryption.public_key
        self._box = SealBox(encryption, encryption)
        self._entry = encryption.derive_key(_ENTRY_CONTEXT)
        self._chain = encryption.derive_key(_CHAIN_CONTEXT)
        self._kv = encryption.derive_key(_KV_CONTEXT)

    # --- values -----------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        return self._box.seal(plaintext)

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of a value sealed by this key; `DecryptionError` otherwise."""
        return self._box.open(sealed)

    # --- log entries --------------------------------------------------------------------

    def tag(self, seq: int, body: bytes) -> str:
        """The entry tag of `body` stored at position `seq`."""
        return hmac.new(self._entry, seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()

    def verify(self, seq: int, body: bytes, tag: str | None) -> bool:
        return _same(self.tag(seq, body), tag)

    def link(self, seq: int, body_digest: str, previous: str) -> str:
        """The chain link of an entry at `seq` whose body has `body_digest`."""
        return self._link(seq, bytes.fromhex(body_digest), previous)

    def erased_link(self, seq: int, previous: str) -> str:
        """The link a rewritten log gives a position whose bytes were already erased."""
        return self._link(seq, _ERASED, previous)

    def _link(self, seq: int, content: bytes, previous: str) -> str:
        message = seq.to_bytes(8, "big") + content + previous.encode("ascii")
        return hmac.new(self._chain, message, hashlib.sha256).hexdigest()

    def links(self, link: str | None, expected: str) -> bool:
        return _same(expected, link)

    # --- KV entries -----------------------------------------------------------------------

    def kv_tag(self, bucket: str, key: str, revision: int, value: bytes) -> str:
        """The tag of a KV entry: which bucket, which key, which revision, which bytes."""
        head = f"{bucket}\x00{key}\x00{revision}\x00".encode()
        return hmac.new(self._kv, head + value, hashlib.sha256).hexdigest()

    def verify_kv(
        self, bucket: str, key: str, revision: int, value: bytes, tag: str | None
    ) -> bool:
        return _same(self.kv_tag(bucket, key, revision, value), tag)

    def __repr__(self) -> str:
        return f"Barrier({self.public_key}, <keys hidden>)"


def _same(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a computed tag with one read from the bus (any text)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))
