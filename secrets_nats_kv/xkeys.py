"""Curve (X25519) nkeys and the `xkv1` seal format that carries every secret (PROTOCOL.md §1).

Sealed message layout, byte for byte:

    b"xkv1" || nonce(24) || crypto_box(plaintext, nonce, recipient_public, sender_private)

`crypto_box` is NaCl's box (X25519 + XSalsa20-Poly1305), i.e. PyNaCl's
`Box(sender_private, recipient_public).encrypt(plaintext, nonce)` without the nonce
PyNaCl puts in front.  Opening needs the recipient's private key and the sender's
public key.  Every failure to open is an `errors.DecryptionError`.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.exceptions
import nacl.public
import nacl.utils

from .errors import DecryptionError, InvalidKey
from .nkeys import Role, decode_public, decode_seed, encode_public, encode_seed

HEADER = b"xkv1"
NONCE_SIZE = nacl.public.Box.NONCE_SIZE  # 24
_BODY_START = len(HEADER) + NONCE_SIZE  # 28: a sealed message must be longer than this


class XKey:
    """A curve key: public only (`X…`) or with its seed (`SX…`), which it never shows."""

    __slots__ = ("_private", "_public", "public_key")

    def __init__(
        self,
        public: nacl.public.PublicKey,
        private: nacl.public.PrivateKey | None,
        text: str | None = None,
    ) -> None:
        self._public = public
        self._private = private
        # `text` is the already validated key text (from_public): no need to encode it again.
        self.public_key = text if text is not None else encode_public(Role.CURVE, bytes(public))

    @classmethod
    def from_seed(cls, seed_text: str) -> XKey:
        """Load a curve seed (`SX…`); any other text raises `InvalidKey`."""
        _, raw = decode_seed(seed_text, Role.CURVE)
        private = nacl.public.PrivateKey(raw)
        return cls(private.public_key, private)

    @classmethod
    def generate(cls) -> XKey:
        """A fresh random curve key with its seed."""
        private = nacl.public.PrivateKey.generate()
        return cls(private.public_key, private)

    @classmethod
    def from_public(cls, text: str) -> XKey:
        """A public-only curve key (`X…`): a peer to seal to or open from."""
        return cls(nacl.public.PublicKey(decode_public(text, Role.CURVE)), None, text)

    @property
    def has_private(self) -> bool:
        """Whether this key can seal and open (it holds the seed), not just be a peer."""
        return self._private is not None

    @property
    def seed(self) -> str:
        """The seed text (`SX…`): secret, never logged.  Raises `InvalidKey` if public only."""
        return encode_seed(Role.CURVE, bytes(self._require_private()))

    def seal(self, plaintext: bytes, recipient: XKey | str) -> bytes:
        """Seal `plaintext` from this key to `recipient` with a fresh random nonce."""
        return SealBox(self, recipient).seal(plaintext)

    def open(self, sealed: bytes, sender: XKey | str) -> bytes:
        """Open a message `sender` sealed to this key; any failure is a `DecryptionError`."""
        try:
            box = SealBox(self, sender)
        except InvalidKey as exc:
            raise DecryptionError(f"cannot open: {exc}") from None
        return box.open(sealed)

    def derive_key(self, context: bytes) -> bytes:
        """A 32-byte secret for another purpose (e.g. event MACs), one per `context`.

        HMAC-SHA256 keyed by the private scalar over `context`: the seed itself is never
        reused outside NaCl, and different contexts give unrelated keys.
        """
        return hmac.new(bytes(self._require_private()), context, hashlib.sha256).digest()

    def _require_private(self) -> nacl.public.PrivateKey:
        if self._private is None:
            raise InvalidKey("a curve key with its seed (SX…)", "a public-only curve key (X…)")
        return self._private

    def __repr__(self) -> str:
        kind = "with seed" if self._private is not None else "public only"
        return f"XKey({self.public_key}, {kind})"

    def __str__(self) -> str:
        return self.public_key


class SealBox:
    """Own private key + peer public key with the X25519 shared key computed once.

    For hot paths: the backend opens values sealed by its encryption key to itself for
    every `get`, so the key agreement is paid once, not per message.  Building one from
    a public-only `own` key or bad `peer` text raises `InvalidKey`.
    """

    __slots__ = ("_box", "own", "peer")

    def __init__(self, own: XKey, peer: XKey | str) -> None:
        self.own = own
        self.peer = peer if isinstance(peer, XKey) else XKey.from_public(peer)
        self._box = nacl.public.Box(own._require_private(), self.peer._public)

    def seal(self, plaintext: bytes) -> bytes:
        """Seal `plaintext` from `own` to `peer` with a fresh random nonce."""
        return self._seal_with_nonce(plaintext, nacl.utils.random(NONCE_SIZE))

    def _seal_with_nonce(self, plaintext: bytes, nonce: bytes) -> bytes:
        """The one place a message is sealed; a fixed nonce is for reproducing test vectors only."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        return HEADER + self._box.encrypt(plaintext, nonce)

    def open(self, sealed: bytes) -> bytes:
        """Open a message `peer` sealed to `own`; any failure is a `DecryptionError`."""
        if not sealed.startswith(HEADER):
            raise DecryptionError("not an xkv1 sealed message (wrong header)")
        if len(sealed) <= _BODY_START:
            raise DecryptionError("sealed message too short (no ciphertext after the nonce)")
        try:
            return self._box.decrypt(sealed[_BODY_START:], sealed[len(HEADER) : _BODY_START])
        except nacl.exceptions.CryptoError:
            raise DecryptionError(
                "the sealed message did not open: tampered, or not sealed between these keys"
            ) from None

    def __repr__(self) -> str:
        return f"SealBox(own={self.own.public_key}, peer={self.peer.public_key})"
