"""The one builder of stream, subject and bucket names (`secrets_nats_kv.streams`).

Every room and the permissions profile call it, so they cannot disagree any more; what
can still go wrong is the builder itself: a renamed stream orphans what deployments have
stored, and two names that meet let one backend's (or one stream's) messages land in
another's. Both are checked here, the second for every backend name.
"""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv import streams
from secrets_nats_kv.config import BackendNames

# What `BackendNames` accepts as a name, less what no operator types (and NATS's own
# stream-name rules forbid anyway): one subject token.
backend_names = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=24)
# Collisions hide in names that extend each other (`a` and `a_events`), which two
# independent draws almost never give: the second name is often the first extended.
_tails = st.text(string.ascii_letters + "_", max_size=4)
_suffixes = st.sampled_from(["_events", "_access", "_anchor", "_state", "_rotating", "_", "_a", ""])
name_pairs = backend_names.flatmap(
    lambda a: st.tuples(
        st.just(a),
        st.one_of(backend_names, st.tuples(_suffixes, _tails).map(lambda s: a + s[0] + s[1])),
    )
)


def stream_names(name: str) -> dict[str, str]:
    """Every stream a backend of this name owns, by role."""
    return {
        "events": streams.events_stream(name),
        "access": streams.access_stream(name),
        "anchor": streams.anchor_stream(name),
        "staging": streams.staging_stream(name),
        "state": streams.kv_stream(streams.state_bucket(name)),
    }


def subject_spaces(name: str) -> dict[str, str]:
    """What each of a backend's streams (and the lock) captures; `X.>` or a plain subject."""
    return {
        "events": streams.events_subjects(name),
        "access": streams.access_subject(name),
        "anchor": streams.anchor_subject(name),
        "staging": streams.staging_subjects(name),
        "lock": streams.rotation_lock_subject(name),
        "state": streams.kv_subjects(streams.state_bucket(name)),
    }


def meet(a: str, b: str) -> bool:
    """Whether some subject is in both spaces (each a plain subject or `prefix.>`)."""

    def prefix(space: str) -> str | None:
        return space[:-1] if space.endswith(".>") else None

    pa, pb = prefix(a), prefix(b)
    if pa is None and pb is None:
        return a == b
    if pa is None:
        return a.startswith(pb or "")
    if pb is None:
        return b.startswith(pa)
    return pa.startswith(pb) or pb.startswith(pa)


def test_the_stored_names_are_as_deployments_have_them() -> None:
    name = "nats-kv"
    assert stream_names(name) == {
        "events": "SECRETS_nats-kv_events",
        "access": "SECRETS_nats-kv_access",
        "anchor": "SECRETS_nats-kv_anchor",
        "staging": "SECRETS_nats-kv_events_rotating",
        "state": "KV_SECRETS_nats-kv_state",
    }
    assert subject_spaces(name) == {
        "events": "wasmcloud_secrets_events.nats-kv.>",
        "access": "wasmcloud_secrets_access.nats-kv",
        "anchor": "wasmcloud_secrets_anchor.nats-kv",
        "staging": "wasmcloud_secrets_rotating.nats-kv.>",
        "lock": "wasmcloud_secrets_rotation_lock.nats-kv",
        "state": "$KV.SECRETS_nats-kv_state.>",
    }
    assert streams.kv_stream("WASMCLOUD_SECRETS") == "KV_WASMCLOUD_SECRETS"
    assert streams.kv_subject("WASMCLOUD_SECRETS", "db") == "$KV.WASMCLOUD_SECRETS.db"
    assert BackendNames(name=name).state_bucket == "SECRETS_nats-kv_state"


@given(name_pairs)
def test_no_two_streams_share_a_name(pair: tuple[str, str]) -> None:
    """Within a backend and across two: each (backend, role) has a stream of its own."""
    a, b = pair
    owners: dict[str, tuple[str, str]] = {}
    for name in {a, b}:
        for role, stream in stream_names(name).items():
            assert stream not in owners, (stream, owners.get(stream), (name, role))
            owners[stream] = (name, role)


@given(name_pairs)
def test_no_two_subject_spaces_meet(pair: tuple[str, str]) -> None:
    """A message for one stream (or the lock) is never captured by another's subjects."""
    a, b = pair
    spaces = [(n, role, space) for n in {a, b} for role, space in subject_spaces(n).items()]
    for i, (name, role, space) in enumerate(spaces):
        for other_name, other_role, other in spaces[i + 1 :]:
            assert not meet(space, other), ((name, role, space), (other_name, other_role, other))


@given(st.sampled_from(["WASMCLOUD_SECRETS", "SECRETS_a_state"]), st.text(min_size=1))
def test_a_key_comes_back_from_its_subject(bucket: str, key: str) -> None:
    subject = streams.kv_subject(bucket, key)
    assert subject.removeprefix(streams.kv_subject_prefix(bucket)) == key
    assert meet(streams.kv_subjects(bucket), subject)
