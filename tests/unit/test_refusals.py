"""Reading nats-py's permission-violation errors (secrets_nats_kv.nats.refusals)."""

from __future__ import annotations

import nats.errors
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.nats.refusals import PUBLISH, SUBSCRIBE, Refusals

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1
)
SUBJECT = st.lists(TOKEN, min_size=1, max_size=5).map(".".join)
PREFIX = "_INBOX_SNKV.nats-kv.admin"


def violation(verb: str, subject: str) -> nats.errors.Error:
    """The error nats-py hands the error callback for the server's -ERR (lower-cased)."""
    return nats.errors.Error(f'nats: permissions violation for {verb} to "{subject}"'.lower())


@given(SUBJECT, SUBJECT)
def test_a_refused_publish_dooms_requests_to_that_subject_only(refused: str, other: str) -> None:
    record = Refusals()
    assert record.note(violation("publish", refused))
    found = record.refusal(refused, PREFIX)
    assert found is not None
    assert (found.action, found.subject) == (PUBLISH, refused)  # named as the caller spells it
    assert f"permission denied to publish to {refused} " in str(found)
    if other.lower() != refused.lower():
        assert record.refusal(other, PREFIX) is None


@given(TOKEN, SUBJECT)
def test_a_refused_reply_inbox_dooms_every_request(token: str, subject: str) -> None:
    record = Refusals()
    assert record.note(violation("subscription", f"{PREFIX}.{token}.*"))
    found = record.refusal(subject, PREFIX)
    assert found is not None
    assert (found.action, found.subject) == (SUBSCRIBE, f"{PREFIX}.>")
    assert record.refusal(subject, "_INBOX") is None  # another connection's inboxes


def test_other_errors_are_not_refusals() -> None:
    record = Refusals()
    assert not record.note(nats.errors.Error("nats: stale connection"))
    assert not record.note(nats.errors.TimeoutError())
    assert record.seen == []
