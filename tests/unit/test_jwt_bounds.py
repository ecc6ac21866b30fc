"""What an unauthenticated token can cost: a size limit, the issuer first, a cache bounded in bytes.

Tokens come from anyone on the bus. A token over the size limit is refused before it is
decoded; with trusted issuers, a token from anyone else is refused before its signature
is checked and is never cached; and however many big, unique, validly self-signed
tokens arrive (no trusted issuers: any issuer is accepted), the cache holds at most
`CACHE_BYTES` of them. The memory figure is measured with tracemalloc, with a wide margin.
"""

from __future__ import annotations

import gc
import secrets
import tracemalloc

import pytest

from secrets_nats_kv import jwt
from secrets_nats_kv.errors import InvalidJWT
from secrets_nats_kv.nkeys import Role, SigningKey
from support.tokens import encode_jwt, mint_component_jwt

MODULE = SigningKey.generate(Role.MODULE)
MIB = 1024 * 1024


def padded_token(account: SigningKey, size: int) -> str:
    """A valid component token of about `size` characters (the padding is in its name)."""
    claims: dict[str, object] = {
        "jti": secrets.token_hex(11),
        "iat": 1,
        "iss": account.public_key,
        "sub": MODULE.public_key,
        "wascap": {"name": "x" * (size * 3 // 4 - 400)},
    }
    return encode_jwt(claims, account)


def test_a_token_over_the_limit_is_refused_before_anything_else() -> None:
    account = SigningKey.generate(Role.ACCOUNT)
    token = padded_token(account, 64 * 1024)
    assert len(token) > jwt.MAX_TOKEN_LENGTH
    before = jwt._verified.cache_info().misses
    with pytest.raises(InvalidJWT) as refused:
        jwt.verify_entity_jwt(token)
    assert refused.value.reason == f"malformed: longer than {jwt.MAX_TOKEN_LENGTH} characters"
    assert jwt._verified.cache_info().misses == before  # not even looked up


def test_a_wascap_token_fits_the_limit_with_room_to_spare() -> None:
    account = SigningKey.generate(Role.ACCOUNT)
    token = mint_component_jwt(account, MODULE.public_key, name="a-component-with-a-long-name")
    assert len(token) * 4 < jwt.MAX_TOKEN_LENGTH
    assert jwt.verify_entity_jwt(token).sub == MODULE.public_key


def test_an_untrusted_issuer_is_refused_before_its_signature_is_checked() -> None:
    stranger, trusted = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.ACCOUNT)
    token = mint_component_jwt(stranger, MODULE.public_key)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # bad signature
    only = frozenset({trusted.public_key})
    for candidate in (token, forged):
        with pytest.raises(InvalidJWT) as refused:
            jwt.verify_entity_jwt(candidate, trusted_issuers=only)
        assert refused.value.reason == f"issuer {stranger.public_key} is not a trusted issuer"
    with pytest.raises(InvalidJWT, match="signature does not verify"):
        jwt.verify_entity_jwt(forged)  # without the issuer rule, the signature is what fails


def test_an_untrusted_token_is_never_cached() -> None:
    stranger, trusted = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.ACCOUNT)
    only = frozenset({trusted.public_key})
    size = jwt._verified.cache_info().currsize
    for _ in range(50):
        token = padded_token(stranger, 8 * 1024)
        with pytest.raises(InvalidJWT, match="not a trusted issuer"):
            jwt.verify_entity_jwt(token, trusted_issuers=only)
    assert jwt._verified.cache_info().currsize == size


def test_a_cached_token_is_still_refused_once_its_issuer_is_untrusted() -> None:
    account, other = SigningKey.generate(Role.ACCOUNT), SigningKey.generate(Role.ACCOUNT)
    token = mint_component_jwt(account, MODULE.public_key)
    assert jwt.verify_entity_jwt(token).iss == account.public_key  # cached now
    with pytest.raises(InvalidJWT, match="not a trusted issuer"):
        jwt.verify_entity_jwt(token, trusted_issuers=frozenset({other.public_key}))


def test_many_big_unique_tokens_cost_at_most_the_cache_bound() -> None:
    """The issue's attack at the size limit: memory stays within CACHE_BYTES plus margin
    (bench/bench_abuse.py measures the backend's RSS under 6,000 such gets)."""
    account = SigningKey.generate(Role.ACCOUNT)
    size = jwt.MAX_TOKEN_LENGTH - 64
    jwt._verified.cache_clear()
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(1500):
            assert jwt.verify_entity_jwt(padded_token(account, size)).iss == account.public_key
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
        kept = jwt._verified.cache_info()
    finally:
        tracemalloc.stop()
        jwt._verified.cache_clear()
    assert kept.bytes <= jwt.CACHE_BYTES
    # Bounded in entries only, 1,500 tokens of 16 KiB would keep about 48 MiB.
    assert grown < 12 * MIB, f"{grown / MIB:.1f} MiB"
