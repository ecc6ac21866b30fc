"""Buckets the event log does not explain: found before anything writes, never skipped.

The KV views are a projection of the log, so every entry in them must be one the log
implies. Three findings mean something else wrote them, and every writer refuses:

- a bucket made by NATS's KV API (`deny_delete`, as the original Rust secrets-nats-kv
  makes them) holding entries: the original's data, which only `import` may take over;
- a bucket an unfinished `import` is replacing (its stream carries `IMPORT_MARKER`);
- a bucket whose last revision is past what the log implies at a head read after it,
  which is what a writer other than a peer backend (an old instance still running, a
  stock KV client) leaves behind.

A peer backend's write is never one of them: it appends to the log before it writes the
bucket, so a head read after the bucket read always explains it.

A fourth finding is an entry the backend did not write: every entry a backend writes
carries its KV tag (`barrier.kv_tag` over bucket, key, revision, value), so the newest
entry of either bucket, read at start-up, must carry it. Someone without the key can
copy a value the log implies (sealed bytes, a mapping's names) into the revision a
crashed backend had not written yet; its content alone would pass, its tag does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import RawStreamMsg

from projections.state import ViewState
from secrets_nats_kv.barrier import KV_TAG_HEADER, Barrier
from secrets_nats_kv.errors import SecretsBackendError, StorageError
from secrets_nats_kv.nats.jetstream import to_backend_error
from secrets_nats_kv.streams import kv_stream, kv_subject_prefix

IMPORT_MARKER = "secrets-nats-kv-import"  # stream metadata key while `import` replaces it
IMPORT_REPLACING = "replacing"
IMPORT_DONE = "done"
_API_TIMEOUT = 5.0
_RUN_IMPORT = "run `secrets-nats-kv import` to take them over"


class UnexplainedEntries(StorageError):
    """A bucket holds entries the event log does not explain; nothing was written."""

    def __init__(self, why: str) -> None:
        super().__init__("KV views", why)


@dataclass(frozen=True, slots=True)
class BucketFound:
    """What a bucket's stream looked like when read: `exists` False if there is none."""

    bucket: str
    exists: bool = False
    deny_delete: bool = False
    marker: str | None = None  # the IMPORT_MARKER metadata, if any
    messages: int = 0
    last_seq: int = 0

    @property
    def stream(self) -> str:
        return kv_stream(self.bucket)

    @property
    def importing(self) -> bool:
        return self.marker == IMPORT_REPLACING

    @property
    def original_layout(self) -> bool:
        """Made by the KV API (the original's `create_key_value`), with entries in it."""
        return self.exists and self.deny_delete and self.messages > 0


async def inspect_bucket(nc: NATS, bucket: str) -> BucketFound:
    """Read one bucket's stream config and state (a missing stream is `exists=False`)."""
    try:
        info = await nc.jetstream(timeout=_API_TIMEOUT).stream_info(kv_stream(bucket))
    except nats.js.errors.NotFoundError:
        return BucketFound(bucket)
    except nats.errors.Error as exc:
        raise to_backend_error(f"bucket info {bucket}", exc) from None
    metadata = info.config.metadata or {}
    return BucketFound(
        bucket,
        exists=True,
        deny_delete=bool(info.config.deny_delete),
        marker=metadata.get(IMPORT_MARKER),
        messages=info.state.messages,
        last_seq=info.state.last_seq,
    )


async def inspect_views(nc: NATS, secrets_bucket: str, state_bucket: str) -> list[BucketFound]:
    """Both buckets, secrets first."""
    return [await inspect_bucket(nc, secrets_bucket), await inspect_bucket(nc, state_bucket)]


async def why_no_backend(
    nc: NATS, secrets_bucket: str, state_bucket: str, *, log_exists: bool
) -> UnexplainedEntries | None:
    """Why no backend answers, if it is because of the buckets (for client commands).

    A backend refuses to start on buckets only `import` may take over; a command whose
    request nobody answered says so instead of just "no backend answered". None when the
    buckets are not the reason, or cannot be read (a user without JetStream rights).
    """
    try:
        found = await inspect_views(nc, secrets_bucket, state_bucket)
    except SecretsBackendError:
        return None
    try:
        for bucket in found:
            check_layout(bucket)
            if not log_exists:
                check_explained(bucket, 0)
    except UnexplainedEntries as exc:
        return exc
    return None


def check_layout(found: BucketFound) -> None:
    """Refuse a bucket only `import` may touch: the original's, or one mid-import."""
    if found.importing:
        raise UnexplainedEntries(
            f"{found.stream} is being replaced by an unfinished import: "
            "run `secrets-nats-kv import` again to finish it"
        )
    if found.original_layout:
        raise UnexplainedEntries(
            f"{found.stream} holds {found.messages} entries the event log does not explain "
            f"(buckets of the original secrets-nats-kv): {_RUN_IMPORT}"
        )


def check_explained(found: BucketFound, explained: int) -> None:
    """Refuse unless every revision of `found` is one the log implies (`explained`)."""
    check_layout(found)
    if found.last_seq > 0 and explained == 0:
        # The log was deleted, emptied or replaced (or never held these): starting would
        # begin history again at version 1 and hand out versions the views still hold.
        raise UnexplainedEntries(
            f"the event log is empty but the KV views hold revisions ({found.stream} is at "
            f"{found.last_seq}): the log was deleted or replaced; restore it (or drop both "
            "buckets to start afresh); stop any other writer; if they are the original "
            f"secrets-nats-kv's, {_RUN_IMPORT}"
        )
    if found.last_seq > explained:
        raise UnexplainedEntries(
            f"{found.stream} is at revision {found.last_seq} but the event log explains only "
            f"{explained} (another writer, or the original secrets-nats-kv's data?): "
            f"stop any other writer; if they are the original's, {_RUN_IMPORT}"
        )


def check_views(secrets: BucketFound, state_bucket: BucketFound, view: ViewState) -> None:
    """Both buckets against a fold of the log read after them."""
    check_explained(secrets, view.secrets_revision)
    check_explained(state_bucket, view.state_revision)


def expected_at(state: ViewState, revision: int) -> tuple[str, bytes, str | None] | None:
    """The (key, value, KV-Operation) the log puts at a secrets-bucket revision.

    None where the bucket must hold nothing readable: an erased or skipped revision, a
    destroyed version, or one the fold does not know.
    """
    for name, record in state.secrets.items():
        if revision not in record.revisions:
            continue
        if revision in record.markers:
            return name, b"", "DEL"  # an imported purge marker compares by key only
        version = record.versions.get(revision)
        if version is None or version.sealed is None:
            return None
        return name, version.sealed, None
    return None


def check_tagged(found: BucketFound, message: RawStreamMsg, barrier: Barrier | None) -> None:
    """Refuse an entry without this backend's KV tag for its bucket, key and revision."""
    if barrier is None:
        return
    key = (message.subject or "").removeprefix(kv_subject_prefix(found.bucket))
    tag = (message.headers or {}).get(KV_TAG_HEADER)
    if not barrier.verify_kv(found.bucket, key, message.seq or 0, message.data or b"", tag):
        raise UnexplainedEntries(
            f"{found.stream} revision {message.seq} holds an entry this backend did not write "
            "(not tagged by this ENCRYPTION_XKEY_SEED): stop whatever wrote it, then run "
            "`secrets-nats-kv rebuild`"
        )


async def check_tail(
    nc: NATS, found: BucketFound, state: ViewState, barrier: Barrier | None = None
) -> None:
    """Refuse if the secrets bucket's newest entry is not the one the log puts there, or
    (with `barrier`) not one a backend wrote.

    A foreign write at a revision the log also explains (an old instance wrote, then a
    command appended the event whose write then failed) would otherwise be skipped as
    already written by a restarted writer.
    """
    if found.last_seq == 0:
        return
    try:
        message = await nc.jetstream(timeout=_API_TIMEOUT).get_msg(found.stream, seq=found.last_seq)
    except nats.js.errors.NotFoundError:
        return  # erased: nothing readable there
    except nats.errors.Error as exc:
        raise to_backend_error(f"read {found.stream} #{found.last_seq}", exc) from None
    if any(found.last_seq in versions for versions in state.destroyed.values()):
        return  # destroyed by the log; its erasure may not have happened yet
    expected = expected_at(state, found.last_seq)
    key = (message.subject or "").removeprefix(kv_subject_prefix(found.bucket))
    operation = (message.headers or {}).get("KV-Operation")
    if expected is None:
        same = not message.data and operation is None  # an erased entry's placeholder
    elif expected[2] is not None:
        same = key == expected[0] and operation in ("DEL", "PURGE")
    else:
        same = (key, message.data or b"", operation) == expected
    if not same:
        raise UnexplainedEntries(
            f"{found.stream} revision {found.last_seq} holds an entry the event log does not "
            "explain (another writer, or the original secrets-nats-kv still running?): stop "
            f"it; if the bucket holds the original's data, {_RUN_IMPORT}"
        )
    # Content the log explains, but is it ours? (Checked second: a write the log does not
    # explain at all is likelier the original still running, and says so.)
    check_tagged(found, message, barrier)


async def check_state_tail(
    nc: NATS, found: BucketFound, state: ViewState, barrier: Barrier | None = None
) -> None:
    """Refuse if the state bucket's newest entry is not the mapping the log wrote last,
    or (with `barrier`) not one a backend wrote.

    Only when the bucket is exactly where the log says (a writer behind has not written
    the newest yet, and an older revision's content is not kept by the fold).
    """
    if found.last_seq == 0 or found.last_seq != state.state_revision:
        return
    try:
        message = await nc.jetstream(timeout=_API_TIMEOUT).get_msg(found.stream, seq=found.last_seq)
    except nats.js.errors.NotFoundError:
        return
    except nats.errors.Error as exc:
        raise to_backend_error(f"read {found.stream} #{found.last_seq}", exc) from None
    key = (message.subject or "").removeprefix(kv_subject_prefix(found.bucket))
    if state.last_mapping:
        names = sorted(state.mappings.get(state.last_mapping, ()))
        same = key == state.last_mapping and (message.data or b"") == msgspec.json.encode(names)
    else:
        same = not message.data  # an imported skip's placeholder, not erased yet
    if not same:
        raise UnexplainedEntries(
            f"{found.stream} revision {found.last_seq} holds a mapping the event log does not "
            "explain (another writer, or the original secrets-nats-kv still running?): stop it"
        )
    check_tagged(found, message, barrier)  # explained content: is it ours?
