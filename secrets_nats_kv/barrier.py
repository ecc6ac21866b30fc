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

The barrier is a keyring too (online key rotation): besides the *current* key it may hold
a *next* one. Sealing, tagging and chaining always use the current key, and entry tags
verify under the current key only (a log is under one key: a mix is not a log of ours);
values open under either, so what the old key sealed stays readable while a backend
switches. `tagged_by` says which held key an entry (or a KV entry) verifies under, so a
start-up or a running backend can tell which key a log is under, and `adopt` makes the
next key the current one in place, so every holder of this object follows the switch.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac

from .errors import DecryptionError
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


class _Key:
    """One encryption key's uses: its sealing box and the three derived MAC keys."""

    __slots__ = ("box", "chain", "entry", "kv", "public_key", "xkey")

    def __init__(self, encryption: XKey) -> None:
        self.xkey = encryption
        self.public_key = encryption.public_key
        self.box = SealBox(encryption, encryption)
        self.entry = encryption.derive_key(_ENTRY_CONTEXT)
        self.chain = encryption.derive_key(_CHAIN_CONTEXT)
        self.kv = encryption.derive_key(_KV_CONTEXT)

    def tag(self, seq: int, body: bytes) -> str:
        return hmac.new(self.entry, seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()

    def kv_tag(self, bucket: str, key: str, revision: int, value: bytes) -> str:
        head = f"{bucket}\x00{key}\x00{revision}\x00".encode()
        return hmac.new(self.kv, head + value, hashlib.sha256).hexdigest()


class Barrier:
    """Seal/open values and tag/verify/chain entries with keys derived from the current
    xkey; open values and tell tags made under the next one too (see the module doc)."""

    __slots__ = ("_current", "_next", "_retired")

    def __init__(self, encryption: XKey, next_key: XKey | None = None) -> None:
        self._current = _Key(encryption)
        same = next_key is not None and next_key.public_key == encryption.public_key
        self._next = _Key(next_key) if next_key is not None and not same else None
        self._retired: _Key | None = None  # the key before `adopt`: opens values only

    # --- the keyring --------------------------------------------------------------------

    @property
    def public_key(self) -> str:
        """The current key: what seals and tags from now on."""
        return self._current.public_key

    @property
    def next_public_key(self) -> str | None:
        return self._next.public_key if self._next is not None else None

    def holds(self, public_key: str) -> bool:
        """Whether `public_key` is the current or the next key."""
        return public_key in (self.public_key, self.next_public_key)

    def alone(self, public_key: str) -> Barrier:
        """A barrier of one held key only (current or next): to read a log under it."""
        for key in (self._current, self._next):
            if key is not None and key.public_key == public_key:
                return Barrier(key.xkey)
        raise KeyError(public_key)

    def adopt(self, public_key: str, *, keep_old: bool = True) -> None:
        """Make the next key (`public_key`) the current one, in place.

        The old current key is kept to open values (`keep_old`: gets still being answered
        from a state folded before the switch), never to seal or tag.
        """
        if self._next is None or self._next.public_key != public_key:
            raise KeyError(public_key)
        old, self._current, self._next = self._current, self._next, None
        self._retired = old if keep_old else None

    def tagged_by(self, seq: int, body: bytes, tag: str | None) -> str | None:
        """The held key (current first, then next) whose entry tag `tag` is, or None."""
        for key in (self._current, self._next):
            if key is not None and _same(key.tag(seq, body), tag):
                return key.public_key
        return None

    def kv_tagged_by(
        self, bucket: str, key: str, revision: int, value: bytes, tag: str | None
    ) -> str | None:
        """The held key whose KV tag `tag` is (current first, then next), or None."""
        for held in (self._current, self._next):
            if held is not None and _same(held.kv_tag(bucket, key, revision, value), tag):
                return held.public_key
        return None

    # --- values -----------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        return self._current.box.seal(plaintext)

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of a value sealed by a key held here (current first); the current
        key's `DecryptionError` otherwise."""
        try:
            return self._current.box.open(sealed)
        except DecryptionError:
            for other in (self._next, self._retired):
                if other is not None:
                    with contextlib.suppress(DecryptionError):
                        return other.box.open(sealed)
            raise

    # --- log entries --------------------------------------------------------------------

    def tag(self, seq: int, body: bytes) -> str:
        """The entry tag of `body` stored at position `seq`."""
        return self._current.tag(seq, body)

    def verify(self, seq: int, body: bytes, tag: str | None) -> bool:
        """Whether `tag` is the current key's tag of `body` at `seq` (the next key's is not:
        a log is read under one key)."""
        return _same(self.tag(seq, body), tag)

    def link(self, seq: int, body_digest: str, previous: str) -> str:
        """The chain link of an entry at `seq` whose body has `body_digest`."""
        return self._link(seq, bytes.fromhex(body_digest), previous)

    def erased_link(self, seq: int, previous: str) -> str:
        """The link a rewritten log gives a position whose bytes were already erased."""
        return self._link(seq, _ERASED, previous)

    def _link(self, seq: int, content: bytes, previous: str) -> str:
        message = seq.to_bytes(8, "big") + content + previous.encode("ascii")
        return hmac.new(self._current.chain, message, hashlib.sha256).hexdigest()

    def links(self, link: str | None, expected: str) -> bool:
        return _same(expected, link)

    # --- KV entries -----------------------------------------------------------------------

    def kv_tag(self, bucket: str, key: str, revision: int, value: bytes) -> str:
        """The tag of a KV entry: which bucket, which key, which revision, which bytes."""
        return self._current.kv_tag(bucket, key, revision, value)

    def verify_kv(
        self, bucket: str, key: str, revision: int, value: bytes, tag: str | None
    ) -> bool:
        return _same(self.kv_tag(bucket, key, revision, value), tag)

    def __repr__(self) -> str:
        following = f", next {self.next_public_key}" if self._next is not None else ""
        return f"Barrier({self.public_key}{following}, <keys hidden>)"


def _same(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a computed tag with one read from the bus (any text)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))
