"""Wascap JWTs (PROTOCOL.md §4): verify the entity and host tokens of a `get`, and mint them.

Decoding and the Ed25519 check are cached per token string (a host sends the same tokens
again and again); `exp` and `nbf` are checked against the clock on every call.  Every
failure is an `InvalidJWT` whose reason never repeats the token.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from .decoding import DECODE_FAILURES, why_undecodable
from .errors import InvalidJWT, InvalidKey
from .nkeys import Role, role_of, verify

CACHE_SIZE = 8192
MAX_TOKEN_LENGTH = 64 * 1024
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


@functools.lru_cache(maxsize=CACHE_SIZE)
def _verified(token: str, host: bool) -> Claims:
    """Everything but the clock; only successes are cached (lru_cache never stores a raise)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidJWT(f"malformed: longer than {MAX_TOKEN_LENGTH} characters")
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


def _check_time(claims: Claims, now: float | None) -> Claims:
    now = time.time() if now is None else now
    if claims.exp is not None and claims.exp < now:
        raise InvalidJWT(f"expired at {_when(claims.exp)}")
    if claims.nbf is not None and now < claims.nbf:
        raise InvalidJWT(f"not valid until {_when(claims.nbf)}")
    return claims


def verify_entity_jwt(token: str, now: float | None = None) -> Claims:
    """Verify a component (`M…`) or provider (`V…`) token issued by an account (`A…`)."""
    return _check_time(_verified(token, False), now)


def verify_host_jwt(token: str, now: float | None = None) -> Claims:
    """Verify a host (`N…`) token issued by an account (`A…`) or by the host itself."""
    return _check_time(_verified(token, True), now)
