"""Wascap JWTs (PROTOCOL.md §4): verify the entity and host tokens of a `get`, and mint them.

Decoding and the Ed25519 check are cached per token string (a host sends the same tokens
again and again); `exp` and `nbf` are checked against the clock on every call.  Every
failure is an `InvalidJWT` whose reason never repeats the token.

Tokens arrive from anyone on the bus, so the cheap refusals come first and nothing is
kept for a token that fails them: the size limit (wascap tokens are a few KB), the
structure, then the trusted-issuer check, and only then the signature and the cache.
The cache is bounded in bytes of token text as well as in entries, so a flood of big
unique tokens costs at most `CACHE_BYTES` of memory, however many there are.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, NamedTuple

import msgspec

from .decoding import DECODE_FAILURES, why_undecodable
from .errors import InvalidJWT, InvalidKey
from .nkeys import Role, role_of, verify

CACHE_SIZE = 8192
CACHE_BYTES = 8 * 1024 * 1024  # of token text; the claims kept per entry are smaller
MAX_TOKEN_LENGTH = 16 * 1024  # characters; a wascap component token is 1-3 KB
WASCAP_REVISION = 3

_ALGORITHM = "Ed25519"
_TYPE = "jwt"
_SIGNATURE_SIZE = 64
_B64URL = re.compile(r"[A-Za-z0-9_-]*")  # unpadded, as PROTOCOL §4 and wascap
_COMPONENT_OR_PROVIDER = "a component (M…) or provider (V…) key"

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Claims(msgspec.Struct, frozen=True):
    """What a verified token says; `sub` is the entity's identity for access checks."""

    jti: str
    iat: int
    iss: str
    sub: str
    kind: str  # "component" | "provider" | "host"
    exp: int | None
    nbf: int | None
    name: str | None


class _Metadata(msgspec.Struct):
    name: str | None = None


class _RawClaims(msgspec.Struct):
    jti: str
    iat: _NonNegative
    iss: str
    sub: str
    exp: _NonNegative | None = None
    nbf: _NonNegative | None = None
    wascap: _Metadata | None = None


_decode_claims = msgspec.json.Decoder(_RawClaims)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str, what: str) -> bytes:
    """Strict unpadded base64url: padding and non-canonical spare bits are refused."""
    if not _B64URL.fullmatch(segment):
        raise InvalidJWT(f"malformed: {what} is not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        raise InvalidJWT(f"malformed: {what} is not unpadded base64url") from None
    if _b64encode(data) != segment:
        raise InvalidJWT(f"malformed: {what} is not canonical base64url")
    return data


def _show(value: object) -> str:
    """A header value for a reason: repr'd and cut short, as it comes from the sender."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_header(data: bytes) -> None:
    try:
        header = msgspec.json.decode(data)
    except DECODE_FAILURES:
        raise InvalidJWT("malformed: header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidJWT("malformed: header is not a JSON object")
    if "alg" not in header:
        raise InvalidJWT(f"bad header: no algorithm (want {_ALGORITHM})")
    if header["alg"] != _ALGORITHM:
        raise InvalidJWT(f"bad algorithm {_show(header['alg'])} (want {_ALGORITHM})")
    if "typ" not in header:
        raise InvalidJWT(f"bad header: no type (want {_TYPE})")
    typ = header["typ"]
    if not isinstance(typ, str) or typ.lower() != _TYPE:
        raise InvalidJWT(f"bad type {_show(typ)} (want {_TYPE})")


def _when(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} seconds after the epoch"


def _role(text: str, what: str) -> Role:
    try:
        return role_of(text)
    except InvalidKey as exc:
        raise InvalidJWT(f"{what} is not a public nkey: found {exc.found}") from None


def _entity_kind(claims: _RawClaims) -> str:
    sub = _role(claims.sub, "subject")
    if sub not in (Role.MODULE, Role.SERVICE):
        raise InvalidJWT(
            f"subject is {sub.key_phrase()} where {_COMPONENT_OR_PROVIDER} is expected"
        )
    iss = _role(claims.iss, "issuer")
    if iss is not Role.ACCOUNT:
        raise InvalidJWT(f"issuer is {iss.key_phrase()} where an account key (A…) is expected")
    return "component" if sub is Role.MODULE else "provider"


def _host_kind(claims: _RawClaims) -> str:
    sub = _role(claims.sub, "subject")
    if sub is not Role.SERVER:
        raise InvalidJWT(f"subject is {sub.key_phrase()} where a host (N…) key is expected")
    iss = _role(claims.iss, "issuer")
    if iss is not Role.ACCOUNT and claims.iss != claims.sub:
        raise InvalidJWT(
            f"issuer is {'another server key' if iss is Role.SERVER else iss.key_phrase()} "
            "where an account key (A…) or the host's own key is expected"
        )
    return "host"


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    currsize: int
    bytes: int


class _Verifier:
    """Verify a token, remembering successes in an LRU bounded in entries and in bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[tuple[str, bool], Claims] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __call__(self, token: str, host: bool, trusted: frozenset[str]) -> Claims:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidJWT(f"malformed: longer than {MAX_TOKEN_LENGTH} characters")
        key = (token, host)
        claims = self._entries.get(key)
        if claims is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            _check_issuer(claims.iss, trusted)
            return claims
        self.misses += 1
        claims = _verify(token, host, trusted)
        self._remember(key, claims)
        return claims

    def _remember(self, key: tuple[str, bool], claims: Claims) -> None:
        self._entries[key] = claims
        self._bytes += _cost(key[0])
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            (token, _), _ = self._entries.popitem(last=False)
            self._bytes -= _cost(token)

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._entries), self._bytes)

    def cache_clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _cost(token: str) -> int:
    """What an entry holds: the token text and claims no bigger than it, plus overhead."""
    return 2 * len(token) + 512


def _check_issuer(issuer: str, trusted: frozenset[str]) -> None:
    if trusted and issuer not in trusted:
        raise InvalidJWT(f"issuer {issuer} is not a trusted issuer")


def _verify(token: str, host: bool, trusted: frozenset[str]) -> Claims:
    """Everything but the clock, cheapest first: structure, issuer, then the signature."""
    segments = token.split(".")
    if len(segments) != 3:
        raise InvalidJWT("malformed: not three segments")
    header, body, signature_segment = segments
    _check_header(_b64decode(header, "header"))
    claims_json = _b64decode(body, "claims")
    try:
        claims = _decode_claims.decode(claims_json)
    except DECODE_FAILURES:
        raise InvalidJWT(f"malformed claims: {why_undecodable(claims_json, _RawClaims)}") from None
    signature = _b64decode(signature_segment, "signature")
    if len(signature) != _SIGNATURE_SIZE:
        raise InvalidJWT(f"malformed: signature is {len(signature)} bytes (want 64)")
    if not claims.iss:
        raise InvalidJWT("issuer (iss) is empty")
    if not claims.sub:
        raise InvalidJWT("subject (sub) is empty")
    _check_issuer(claims.iss, trusted)  # before the signature: an untrusted token costs little
    signed = f"{header}.{body}".encode("ascii")
    try:
        good = verify(claims.iss, signed, signature)
    except InvalidKey as exc:
        raise InvalidJWT(f"issuer is not an Ed25519 public key: found {exc.found}") from None
    if not good:
        raise InvalidJWT(f"signature does not verify against issuer {claims.iss}")
    kind = _host_kind(claims) if host else _entity_kind(claims)
    name = claims.wascap.name if claims.wascap is not None else None
    return Claims(
        jti=claims.jti,
        iat=claims.iat,
        iss=claims.iss,
        sub=claims.sub,
        kind=kind,
        exp=claims.exp,
        nbf=claims.nbf,
        name=name,
    )


_verified = _Verifier(CACHE_SIZE, CACHE_BYTES)


def _check_time(claims: Claims, now: float | None) -> Claims:
    now = time.time() if now is None else now
    if claims.exp is not None and claims.exp < now:
        raise InvalidJWT(f"expired at {_when(claims.exp)}")
    if claims.nbf is not None and now < claims.nbf:
        raise InvalidJWT(f"not valid until {_when(claims.nbf)}")
    return claims


def verify_entity_jwt(
    token: str, now: float | None = None, *, trusted_issuers: frozenset[str] = frozenset()
) -> Claims:
    """Verify a component (`M…`) or provider (`V…`) token issued by an account (`A…`).

    With `trusted_issuers`, a token from any other issuer is refused before its
    signature is checked or anything of it is kept."""
    return _check_time(_verified(token, False, trusted_issuers), now)


def verify_host_jwt(
    token: str, now: float | None = None, *, trusted_issuers: frozenset[str] = frozenset()
) -> Claims:
    """Verify a host (`N…`) token issued by an account (`A…`) or by the host itself."""
    return _check_time(_verified(token, True, trusted_issuers), now)
