"""Protocol fuzz, layer 1: subjects, headers and payloads (see support/fuzz.py for the harness).

Unknown operations and extra subject tokens, missing or mangled headers and keys of other
roles, empty, random and wrongly sealed payloads: each answered in the protocol's own
reply shape, the stored canaries intact afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.errors import InvalidKey
from secrets_nats_kv.naming import validate_entity
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.fuzz import (
    OPS,
    SUBJECT_TOKENS,
    Case,
    FuzzEnv,
    ShortRepr,
    fuzz_environment,
    fuzz_settings,
    is_xkey,
    other_role_keys,
    short,
    xkey_headers,
)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    yield from fuzz_environment(tmp_path_factory)


# --- layer 1: subjects, headers, payloads ---------------------------------------------------


@dataclass(frozen=True)
class Envelope(ShortRepr):
    operation: str
    argument: str | None
    extra: tuple[str, ...]
    headers: dict[str, str] | None
    payload: bytes

    def __repr__(self) -> str:
        return (
            f"Envelope({short(self.operation)}, {short(self.argument)}, {short(self.extra)}, "
            f"headers={short(self.headers)}, payload={short(self.payload)})"
        )


def envelope_expectation(env: FuzzEnv, subject_rest: str, e: Envelope) -> str | None:
    """The reply the protocol fixes for a request whose payload does not open."""
    operation, _, argument = subject_rest.partition(".")
    if operation not in OPS:
        return "unknown"
    if operation == "server_xkey":
        return "xkey"
    if operation in ("add_mapping", "remove_mapping"):
        if not argument:
            return "invalid subject"
        if not _entity_ok(argument):
            return "InvalidRequest"
    if not e.payload:
        return "InvalidPayload"
    if not e.headers:
        return "InvalidHeaders"
    sender = e.headers.get(HOST_XKEY_HEADER)
    if not is_xkey(sender):
        return "InvalidXKey"
    if operation != "get" and sender not in env.config.admin_public_keys:
        return "Unauthorized"
    return "DecryptionError"


def _entity_ok(text: str) -> bool:
    try:
        validate_entity(text)
    except InvalidKey:
        return False
    return True


def envelopes(env: FuzzEnv) -> st.SearchStrategy[Envelope]:
    transit = env.keys.transit.public_key
    senders = [transit, XKey.generate().public_key]
    entity = SigningKey.generate(Role.MODULE).public_key
    payloads = st.one_of(
        st.just(b""),
        st.binary(max_size=300),
        st.binary(max_size=64).map(lambda b: b"xkv1" + b),
        st.tuples(st.binary(min_size=1, max_size=8), st.sampled_from([100_000, 700_000])).map(
            lambda p: (p[0] * (p[1] // len(p[0]) + 1))[: p[1]]
        ),
        # Sealed properly, but to a key that is not the transit key: must not open.
        st.binary(max_size=100).map(lambda b: XKey.generate().seal(b, XKey.generate())),
    )
    return st.builds(
        Envelope,
        operation=st.one_of(st.sampled_from(OPS), SUBJECT_TOKENS),
        argument=st.one_of(
            st.none(), st.just(entity), SUBJECT_TOKENS, st.sampled_from(other_role_keys())
        ),
        extra=st.lists(SUBJECT_TOKENS, max_size=2).map(tuple),
        headers=xkey_headers(senders),
        payload=payloads,
    )


def test_subjects_headers_and_payloads(fuzz: FuzzEnv) -> None:
    @fuzz_settings(800)
    @given(e=envelopes(fuzz))
    def run(e: Envelope) -> None:
        rest = ".".join([e.operation, *([e.argument] if e.argument is not None else []), *e.extra])
        expected = envelope_expectation(fuzz, rest, e)
        fuzz.check(Case("envelope", rest, e.payload, e.headers, expected))

    run()
    fuzz.assert_intact()
