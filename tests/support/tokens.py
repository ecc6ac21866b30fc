"""Mint wascap tokens (component, provider, host) for tests and benchmarks.

Test-only: the product verifies tokens (secrets_nats_kv.jwt) and never issues them.
`encode_jwt` signs claims as given, so tests can mint malformed tokens too.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Mapping

import msgspec

from secrets_nats_kv.jwt import WASCAP_REVISION
from secrets_nats_kv.nkeys import Role, SigningKey, decode_public


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_ENCODED_HEADER = _b64encode(b'{"typ":"jwt","alg":"Ed25519"}')


def encode_jwt(claims: dict[str, object], signer: SigningKey) -> str:
    """Sign `claims` as given (nothing is checked, so tests can mint bad tokens too)."""
    signed = f"{_ENCODED_HEADER}.{_b64encode(msgspec.json.encode(claims))}"
    return f"{signed}.{_b64encode(signer.sign(signed.encode('ascii')))}"


def _claims(
    issuer: SigningKey,
    subject: str,
    metadata: dict[str, object],
    exp: int | None,
    nbf: int | None,
    iat: int | None,
) -> dict[str, object]:
    """Claims in wascap's field order: exp, jti, iat, iss, sub, nbf, wascap, wascap_revision."""
    claims: dict[str, object] = {} if exp is None else {"exp": exp}
    claims["jti"] = secrets.token_hex(11).upper()
    claims["iat"] = int(time.time()) if iat is None else iat
    claims["iss"] = issuer.public_key
    claims["sub"] = subject
    if nbf is not None:
        claims["nbf"] = nbf
    claims["wascap"] = metadata
    claims["wascap_revision"] = WASCAP_REVISION
    return claims


def mint_component_jwt(
    account: SigningKey,
    module_public: str,
    *,
    name: str = "component",
    exp: int | None = None,
    nbf: int | None = None,
    iat: int | None = None,
) -> str:
    """A component token for module key `module_public` (`M…`), signed by `account`."""
    decode_public(module_public, Role.MODULE)
    metadata: dict[str, object] = {
        "name": name,
        "hash": "",
        "tags": [],
        "rev": 0,
        "ver": "0.1.0",
        "prov": False,
    }
    return encode_jwt(_claims(account, module_public, metadata, exp, nbf, iat), account)


def mint_provider_jwt(
    account: SigningKey,
    service_public: str,
    *,
    name: str = "provider",
    exp: int | None = None,
    nbf: int | None = None,
    iat: int | None = None,
) -> str:
    """A capability provider token for service key `service_public` (`V…`), signed by `account`."""
    decode_public(service_public, Role.SERVICE)
    metadata: dict[str, object] = {
        "name": name,
        "vendor": "secrets-nats-kv",
        "rev": 0,
        "ver": "0.1.0",
        "target_hashes": {},
    }
    return encode_jwt(_claims(account, service_public, metadata, exp, nbf, iat), account)


def mint_host_jwt(
    issuer: SigningKey,
    host_public: str,
    *,
    name: str = "host",
    labels: Mapping[str, str] | None = None,
    exp: int | None = None,
    nbf: int | None = None,
    iat: int | None = None,
) -> str:
    """A host token for server key `host_public` (`N…`), signed by an account or the host."""
    decode_public(host_public, Role.SERVER)
    metadata: dict[str, object] = {"name": name, "labels": dict(labels or {})}
    return encode_jwt(_claims(issuer, host_public, metadata, exp, nbf, iat), issuer)
