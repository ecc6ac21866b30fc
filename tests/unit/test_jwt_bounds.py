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
from collections.abc import Iterator

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


def big_unique_tokens(account: SigningKey, count: int) -> Iterator[str]:
    """Tokens at the size limit, each new (the attack: nothing a cache could share)."""
    for _ in range(count):
        yield padded_token(account, jwt.MAX_TOKEN_LENGTH - 64)


def test_many_big_unique_tokens_cost_at_most_the_cache_bound() -> None:
    """The issue's attack at the size limit: memory stays within the byte bound plus margin
    (bench/bench_abuse.py measures the backend's RSS under 6,000 such gets).

    Measured on a verifier built with a bound of 1 MiB rather than `CACHE_BYTES`: the
    accounting is the same code, and it takes 400 tokens rather than thousands to show
    it (tracemalloc makes each one slow). Bounded in entries only, those 400 tokens would
    keep about 11 MiB, well over the 3 MiB allowed; bounded in bytes they keep under 1 MiB.
    """
    account = SigningKey.generate(Role.ACCOUNT)
    bound = 1 * MIB
    verifier = jwt._Verifier(jwt.CACHE_SIZE, bound)
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for token in big_unique_tokens(account, 400):
            assert verifier(token, False, frozenset()).iss == account.public_key
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    kept = verifier.cache_info()
    assert kept.bytes <= bound
    assert kept.currsize < 400 <= jwt.CACHE_SIZE  # the bytes evicted them, not the count
    assert grown < 3 * bound, f"{grown / MIB:.1f} MiB"


def test_the_backends_cache_stops_at_cache_bytes() -> None:
    """The verifier every `get` goes through applies `CACHE_BYTES`: tokens worth a quarter
    more than it leave the cache at or under it, having evicted by bytes (far fewer
    tokens than `CACHE_SIZE`)."""
    account = SigningKey.generate(Role.ACCOUNT)
    count = 5 * jwt.CACHE_BYTES // (4 * 2 * jwt.MAX_TOKEN_LENGTH)
    jwt._verified.cache_clear()
    try:
        for token in big_unique_tokens(account, count):
            assert jwt.verify_entity_jwt(token).iss == account.public_key
        kept = jwt._verified.cache_info()
    finally:
        jwt._verified.cache_clear()
    assert kept.bytes <= jwt.CACHE_BYTES
    assert kept.currsize < count < jwt.CACHE_SIZE
