"""The check before staging is dropped: the rebuilt KV views must match the staged log.

The staging stream is the only durable source once committed, so it is dropped only
after the rebuilt buckets agree with a fold of the staged log done here, independently
of `rebuild_views`: a rebuild that read an incomplete log (a lost message looks like an
erased entry to the fold) fails the rotation instead.
"""

from __future__ import annotations

from events.types import Event, Rejected
from projections.rebuild import RebuildReport
from projections.state import (
    EraseSecretRevisions,
    MarkSecretDeleted,
    PutSecretEntry,
    ViewState,
    fold,
)
from secrets_nats_kv.nats.jetstream import StreamState


class ExpectedBuckets:
    """What the KV buckets must hold after a rebuild of the staged log."""

    def __init__(self, history: int) -> None:
        self.state = ViewState()
        self._history = history
        self._present: dict[str, list[int]] = {}  # key -> revisions the bucket keeps
        self._key_of: dict[int, str] = {}

    def add(self, seq: int, entry: Event | Rejected | None) -> None:
        for effect in fold(self.state, seq, entry):
            match effect:
                case PutSecretEntry(key, revision, _, _) | MarkSecretDeleted(key, revision):
                    kept = self._present.setdefault(key, [])
                    kept.append(revision)
                    self._key_of[revision] = key
                    if len(kept) > self._history:  # the bucket's history per key
                        del self._key_of[kept.pop(0)]
                case EraseSecretRevisions(revisions):
                    for revision in revisions:
                        if revision in self._key_of:
                            self._present[self._key_of.pop(revision)].remove(revision)
                case _:
                    pass  # placeholders are erased as written; the rest is not this bucket

    def mismatch(
        self, report: RebuildReport, secrets: StreamState | None, mappings: StreamState | None
    ) -> str | None:
        """What differs between the rebuilt views and this fold, or None."""
        state = self.state
        secrets, mappings = secrets or StreamState(), mappings or StreamState()
        checks = {
            "log entries": (report.events, state.last_seq),
            "secrets": (report.secrets, len(state.secrets)),
            "entities": (report.mappings, len(state.mappings)),
            "secrets revision": (report.secrets_revision, state.secrets_revision),
            "secrets bucket head": (secrets.last_seq, state.secrets_revision),
            "secrets bucket entries": (
                secrets.messages,
                sum(len(kept) for kept in self._present.values()),
            ),
            "mappings bucket head": (mappings.last_seq, state.state_revision),
            "mappings bucket entries": (mappings.messages, len(state.mappings)),
        }
        for what, (found, expected) in checks.items():
            if found != expected:
                return f"{what}: {found}, the log implies {expected}"
        return None
