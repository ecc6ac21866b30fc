"""NATS nkeys: the text form of public keys and seeds, and Ed25519 signing keys.

An nkey is base32 (no padding) of `prefix || 32 raw bytes || CRC-16/XMODEM (little-endian)`
(PROTOCOL.md §1).  Every mismatch raises `InvalidKey`, whose `found` describes the text
without ever repeating a seed.
"""

from __future__ import annotations

import base64
import binascii
import enum

import nacl.exceptions
import nacl.signing

from .errors import InvalidKey

SEED_PREFIX = 18 << 3
"""First 5 bits of a seed's first byte: every seed's text starts with `S`."""

RAW_SIZE = 32
PUBLIC_KEY_LENGTH = 56  # base32 of 1 + 32 + 2 bytes
SEED_LENGTH = 58  # base32 of 2 + 32 + 2 bytes


class Role(enum.IntEnum):
    """What a key is for; the value is its prefix byte, which fixes its first letter."""

    ACCOUNT = 0
    CLUSTER = 2 << 3
    MODULE = 12 << 3
    SERVER = 13 << 3
    OPERATOR = 14 << 3
    USER = 20 << 3
    SERVICE = 21 << 3
    CURVE = 23 << 3

    @property
    def letter(self) -> str:
        """The first letter of a public key of this role (the second of its seed)."""
        return _ALPHABET[self >> 3]

    def key_phrase(self) -> str:
        """How messages name a public key of this role, e.g. `an account key (A…)`."""
        return f"{self._article()} {self.name.lower()} key ({self.letter}…)"

    def seed_phrase(self) -> str:
        """How messages name a seed of this role, e.g. `an account seed (SA…)`."""
        return f"{self._article()} {self.name.lower()} seed (S{self.letter}…)"

    def _article(self) -> str:
        return "an" if self in (Role.ACCOUNT, Role.OPERATOR) else "a"


ED25519_ROLES: tuple[Role, ...] = tuple(role for role in Role if role is not Role.CURVE)
"""The roles whose keys are Ed25519 signing keys (every role but curve)."""

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_ROLES_BY_BYTE = {int(role): role for role in Role}


def crc16_xmodem(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0), the checksum every nkey ends with.

    `binascii.crc_hqx` is exactly this CRC, in C: every request's xkey header is checked.
    """
    return binascii.crc_hqx(data, 0)


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _b32decode(text: str) -> bytes | None:
    """Decode unpadded base32, or None; non-canonical text is refused so one key has one text."""
    try:
        data = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    if len(text) % 8 == 0:
        return data  # whole 40-bit groups have no spare bits: the text is canonical
    return data if _b32encode(data) == text else None


def _with_crc(body: bytes) -> str:
    return _b32encode(body + crc16_xmodem(body).to_bytes(2, "little"))


def _check_raw(raw: bytes) -> None:
    if len(raw) != RAW_SIZE:
        raise ValueError(f"an nkey holds exactly {RAW_SIZE} raw bytes, not {len(raw)}")


def encode_public(role: Role, raw: bytes) -> str:
    """The text (`A…`, `X…`, …) of a 32-byte public key."""
    _check_raw(raw)
    return _with_crc(bytes([role]) + raw)


def encode_seed(role: Role, raw: bytes) -> str:
    """The text (`SA…`, `SX…`, …) of a 32-byte seed."""
    _check_raw(raw)
    return _with_crc(bytes([SEED_PREFIX | role >> 5, (role & 31) << 3]) + raw)


class _Parsed:
    """What a well-formed nkey text holds: its role, whether it is a seed, its raw bytes."""

    __slots__ = ("is_seed", "raw", "role")

    def __init__(self, role: Role, is_seed: bool, raw: bytes) -> None:
        self.role = role
        self.is_seed = is_seed
        self.raw = raw

    def phrase(self) -> str:
        return self.role.seed_phrase() if self.is_seed else self.role.key_phrase()


def _parse(text: str, roles: tuple[Role, ...], seed: bool) -> _Parsed:
    """Check length, base32, checksum and prefix; any InvalidKey says what `roles` expected.

    The expectation is worded only on failure: the success path runs on every request.
    """
    if not text:
        raise InvalidKey(_expected(roles, seed), "empty text")
    if len(text) not in (PUBLIC_KEY_LENGTH, SEED_LENGTH):
        raise InvalidKey(
            _expected(roles, seed),
            f"text of {len(text)} characters (a public key has {PUBLIC_KEY_LENGTH}, "
            f"a seed {SEED_LENGTH})",
        )
    data = _b32decode(text)
    if data is None:
        raise InvalidKey(_expected(roles, seed), "text that is not base32")
    body, crc = data[:-2], int.from_bytes(data[-2:], "little")
    if crc16_xmodem(body) != crc:
        raise InvalidKey(_expected(roles, seed), "a checksum mismatch")
    if len(body) == 1 + RAW_SIZE:
        role = _ROLES_BY_BYTE.get(body[0])
        if role is None:
            raise InvalidKey(
                _expected(roles, seed), f"a key with unknown prefix byte {body[0]:#04x}"
            )
        return _Parsed(role, False, body[1:])
    first, second = body[0], body[1]
    role = _ROLES_BY_BYTE.get((first & 7) << 5 | second >> 3)
    if first & 0xF8 != SEED_PREFIX or second & 7 or role is None:
        raise InvalidKey(_expected(roles, seed), "a seed with an unknown prefix")
    return _Parsed(role, True, body[2:])


def _expected(roles: tuple[Role, ...], seed: bool) -> str:
    if not roles:
        return "an nkey seed" if seed else "a public nkey"
    if set(roles) == set(ED25519_ROLES):
        return "an Ed25519 nkey seed" if seed else "an Ed25519 public nkey"
    return " or ".join(role.seed_phrase() if seed else role.key_phrase() for role in roles)


def decode_public(text: str, *roles: Role) -> bytes:
    """The 32 raw bytes of a public key of one of `roles` (any role if none given)."""
    parsed = _parse(text, roles, seed=False)
    if parsed.is_seed or (roles and parsed.role not in roles):
        raise InvalidKey(_expected(roles, seed=False), parsed.phrase())
    return parsed.raw


def decode_seed(text: str, *roles: Role) -> tuple[Role, bytes]:
    """The role and 32 raw bytes of a seed of one of `roles` (any role if none given)."""
    parsed = _parse(text, roles, seed=True)
    if not parsed.is_seed or (roles and parsed.role not in roles):
        raise InvalidKey(_expected(roles, seed=True), parsed.phrase())
    return parsed.role, parsed.raw


def role_of(text: str) -> Role:
    """The role of a public key (seeds are refused, so callers never route a seed by role)."""
    parsed = _parse(text, (), seed=False)
    if parsed.is_seed:
        raise InvalidKey(_expected((), seed=False), parsed.phrase())
    return parsed.role


class SigningKey:
    """An Ed25519 nkey with its seed: signs JWTs and anything else an identity must vouch for."""

    __slots__ = ("_key", "public_key", "role")

    def __init__(self, role: Role, key: nacl.signing.SigningKey) -> None:
        if role is Role.CURVE:
            raise ValueError("a curve key cannot sign; use xkeys.XKey")
        self.role = role
        self._key = key
        self.public_key = encode_public(role, bytes(key.verify_key))

    @classmethod
    def from_seed(cls, seed_text: str, *roles: Role) -> SigningKey:
        """Load a seed of one of `roles` (any Ed25519 role if none given)."""
        role, raw = decode_seed(seed_text, *(roles or ED25519_ROLES))
        return cls(role, nacl.signing.SigningKey(raw))

    @classmethod
    def generate(cls, role: Role) -> SigningKey:
        """A fresh random key of `role`."""
        return cls(role, nacl.signing.SigningKey.generate())

    @property
    def seed(self) -> str:
        """The seed text (`S…`): secret, never logged."""
        return encode_seed(self.role, bytes(self._key))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached Ed25519 signature of `message`."""
        return self._key.sign(message).signature

    def __repr__(self) -> str:
        return f"SigningKey({self.public_key})"


def verify(public_key_text: str, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is that key's Ed25519 signature of `message`; bad key text raises."""
    raw = decode_public(public_key_text, *ED25519_ROLES)
    try:
        nacl.signing.VerifyKey(raw).verify(message, signature)
    except nacl.exceptions.CryptoError:  # a bad signature, or one that is not 64 bytes
        return False
    return True
