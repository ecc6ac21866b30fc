"""Every stream, subject and bucket name a backend uses, built in this one place.

The rooms that use a stream (`events.log`, `events.access`, `events.anchor`, the
rotation's staging and lock, the KV buckets) and the permissions profile that lets each
role reach it all ask here, so a name cannot drift between the code and the allow-list.
Each takes the backend's name (`-n`), or a bucket's, and returns plain text; the
protocol's request subjects and queue group are `config.BackendNames`'.

These names are stored data: renaming one orphans every deployment's streams, so
tests/unit/test_streams.py pins them as written.
"""

from __future__ import annotations

SERVICE_NAME = "secrets-nats-kv"
"""The NATS micro service every backend instance registers as (`$SRV.*.{SERVICE_NAME}`)."""


# --- the event log ------------------------------------------------------------------------


def events_stream(backend_name: str) -> str:
    """The event log: one stream per backend, the source of truth."""
    return f"SECRETS_{backend_name}_events"


def events_subject_prefix(backend_name: str) -> str:
    """The event log's subjects start with this (`….secret.{name}`, `….mapping.{key}`, …)."""
    return f"wasmcloud_secrets_events.{backend_name}"


def events_subjects(backend_name: str) -> str:
    """Every subject the event log captures."""
    return f"{events_subject_prefix(backend_name)}.>"


# --- beside the log -----------------------------------------------------------------------


def access_stream(backend_name: str) -> str:
    """The access log: a record per `get` decision (not state: nothing folds it)."""
    return f"SECRETS_{backend_name}_access"


def access_subject(backend_name: str) -> str:
    return f"wasmcloud_secrets_access.{backend_name}"


def anchor_stream(backend_name: str) -> str:
    """Where the log's chain stood after the last append (one message kept)."""
    return f"SECRETS_{backend_name}_anchor"


def anchor_subject(backend_name: str) -> str:
    return f"wasmcloud_secrets_anchor.{backend_name}"


# --- rotate-key ---------------------------------------------------------------------------


def staging_stream(backend_name: str) -> str:
    """`rotate-key`'s copy of the log under the new key, until it is swapped in."""
    return f"SECRETS_{backend_name}_events_rotating"


def staging_subject_prefix(backend_name: str) -> str:
    """The staging stream's subjects: never overlapping the live log's."""
    return f"wasmcloud_secrets_rotating.{backend_name}"


def staging_subjects(backend_name: str) -> str:
    return f"{staging_subject_prefix(backend_name)}.>"


def rotation_lock_subject(backend_name: str) -> str:
    """The subject a running `rotate-key` answers on (no stream captures it)."""
    return f"wasmcloud_secrets_rotation_lock.{backend_name}"


JS_STREAM_ADVISORY = "$JS.EVENT.ADVISORY.STREAM"  # the server's stream lifecycle advisories
STREAM_CREATED, STREAM_DELETED = "CREATED", "DELETED"


def stream_advisory(action: str, stream: str) -> str:
    """Where the server announces that `stream` was created or deleted: a backend waits
    on these while a key rotation swaps its log (`actors.swapwatch`)."""
    return f"{JS_STREAM_ADVISORY}.{action}.{stream}"


# --- the KV buckets -----------------------------------------------------------------------


def state_bucket(backend_name: str) -> str:
    """The KV bucket of mappings (the secrets bucket is `-b`, `WASMCLOUD_SECRETS`)."""
    return f"SECRETS_{backend_name}_state"


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket (NATS's naming)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject of one key in a KV bucket (NATS's naming)."""
    return f"{kv_subject_prefix(bucket)}{key}"


def kv_subject_prefix(bucket: str) -> str:
    """What every key's subject in `bucket` starts with; strip it to get the key."""
    return f"$KV.{bucket}."


def kv_subjects(bucket: str) -> str:
    """Every subject a KV bucket's stream captures."""
    return f"$KV.{bucket}.>"
