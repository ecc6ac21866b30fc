"""Least privilege on NATS: what each role may publish and subscribe to, and nothing more.

Three roles share a bus: the backend (`run`), an admin (the CLI) and a wasmCloud host.
Their allow-lists are derived here, from the backend's names alone, so the README's
table, `secrets-nats-kv nats-permissions` and the tests that run every role under these
permissions against a real nats-server all read the same lists.

The backend and the admin CLI take their reply inboxes under a prefix of their own
(`_INBOX_SNKV.{name}.{role}`), outside the hosts' `_INBOX.>`: a host allowed to read its
own replies can then neither read the backend's JetStream answers (and forge its view of
the log's head) nor the admin's. Replies to requests are sent with `allow_responses`,
never with a publish allowance on someone else's inbox.

The stream and subject names are `secrets_nats_kv.streams`', the same builders the rooms
that use those streams call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from secrets_nats_kv import streams
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.streams import kv_stream

SERVICE_NAME = streams.SERVICE_NAME  # the micro service name (actors.service)
INBOX_BASE = "_INBOX_SNKV"
HOST_INBOXES = "_INBOX.>"  # a wasmCloud host's default reply inboxes
JS_API = "$JS.API"
JS_FLOW_CONTROL = "$JS.FC"
JS_SNAPSHOT_RESTORE = "$JS.SNAPSHOT.RESTORE"  # where a restore's chunks go (the server says)
SRV = "$SRV"
_SRV_VERBS = ("PING", "INFO", "STATS")


class NatsRole(enum.StrEnum):
    BACKEND = "backend"
    ADMIN = "admin"
    HOST = "host"


@dataclass(frozen=True)
class Permissions:
    """One role's allow-lists. A subscribe entry `"subject queue"` allows only that queue."""

    role: NatsRole
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool


def events_stream(names: BackendNames) -> str:
    return streams.events_stream(names.name)


def events_subjects(names: BackendNames) -> str:
    return streams.events_subjects(names.name)


def access_stream(names: BackendNames) -> str:
    return streams.access_stream(names.name)


def access_subject(names: BackendNames) -> str:
    return streams.access_subject(names.name)


def anchor_stream(names: BackendNames) -> str:
    return streams.anchor_stream(names.name)


def anchor_subject(names: BackendNames) -> str:
    return streams.anchor_subject(names.name)


def staging_stream(names: BackendNames) -> str:
    return streams.staging_stream(names.name)


def staging_subjects(names: BackendNames) -> str:
    return streams.staging_subjects(names.name)


def rotation_lock_subject(names: BackendNames) -> str:
    return streams.rotation_lock_subject(names.name)


def inbox_prefix(names: BackendNames, role: NatsRole) -> str | None:
    """The reply-inbox prefix a role's connections use (None: the client's default)."""
    if role is NatsRole.HOST:
        return None
    return f"{INBOX_BASE}.{names.name}.{role.value}"


# JetStream API calls, by verb. Ordered consumers (the log's readers) are created with
# `CONSUMER.CREATE.{stream}` or its longer forms (a consumer name, a filter) and are never
# deleted by the client (they expire on the server); their flow-control messages ask for
# an empty reply on `$JS.FC.{stream}.…`. `DIRECT.GET.{stream}` is the request form only.
def _api(stream: str, *verbs: str) -> list[str]:
    subjects: list[str] = []
    for verb in verbs:
        if verb == "CONSUMER.CREATE":
            subjects.append(f"{JS_API}.CONSUMER.CREATE.{stream}")
            subjects.append(f"{JS_API}.CONSUMER.CREATE.{stream}.>")
        elif verb == "DIRECT.GET":
            subjects.append(f"{JS_API}.DIRECT.GET.{stream}")
        else:
            subjects.append(f"{JS_API}.STREAM.{verb}.{stream}")
    return subjects


def _reading(stream: str) -> list[str]:
    """What an ordered consumer over `stream` needs: its API calls and flow-control replies."""
    return [*_api(stream, "INFO", "CONSUMER.CREATE"), f"{JS_FLOW_CONTROL}.{stream}.>"]


def _backend(names: BackendNames) -> Permissions:
    inbox = f"{inbox_prefix(names, NatsRole.BACKEND)}.>"
    events, access = events_stream(names), access_stream(names)
    secrets_kv, state_kv = kv_stream(names.secrets_bucket), kv_stream(names.state_bucket)
    publish = [
        inbox,  # its own round trips (a message to itself proves the server saw a SUB)
        events_subjects(names),  # appends
        access_subject(names),  # get decisions
        streams.kv_subjects(names.secrets_bucket),
        streams.kv_subjects(names.state_bucket),
        *_reading(events),
        # ensure, limits; destroy erases; MSG.GET: which key tags the log, and the entry
        # after an online rotation's fence (actors.keyswitch), the last entry on each
        # subject a get depends on, when the view is behind the log's head
        *_api(events, "CREATE", "UPDATE", "MSG.GET", "MSG.DELETE"),
        *_api(access, "INFO", "CREATE", "UPDATE"),  # ensure, retention limits
        # MSG.GET: the start-up and peer-write checks read what a revision holds
        *_api(secrets_kv, "INFO", "CREATE", "UPDATE", "MSG.GET", "MSG.DELETE"),
        *_api(state_kv, "INFO", "CREATE", "UPDATE", "MSG.GET"),
        anchor_subject(names),  # where the chain stood after each append
        *_api(anchor_stream(names), "INFO", "CREATE", "MSG.GET"),
        *_api(staging_stream(names), "INFO"),  # a key rotation's swap under way?
        # ...and its committed copy folded while the swap refills the log (actors.prefold)
        *_api(staging_stream(names), "CONSUMER.CREATE"),
        f"{JS_FLOW_CONTROL}.{staging_stream(names)}.>",
    ]
    subscribe = [
        f"{names.subject_prefix}.> {names.queue_group}",  # only in the backend's queue group
        inbox,
        *(f"{SRV}.{verb}" for verb in _SRV_VERBS),  # discovery: all services, ...
        *(f"{SRV}.{verb}.{SERVICE_NAME}" for verb in _SRV_VERBS),  # ... ours, ...
        *(f"{SRV}.{verb}.{SERVICE_NAME}.*" for verb in _SRV_VERBS),  # ... one instance
        # a key rotation's swap: its log recreated or deleted, staging dropped (swapwatch)
        streams.stream_advisory(streams.STREAM_CREATED, events),
        streams.stream_advisory(streams.STREAM_DELETED, events),
        streams.stream_advisory(streams.STREAM_DELETED, staging_stream(names)),
    ]
    return Permissions(NatsRole.BACKEND, tuple(publish), tuple(subscribe), allow_responses=True)


def _backup_and_restore(names: BackendNames) -> list[str]:
    """`backup` snapshots, `restore` restores the streams of a backend (app/backup.py);
    a failed restore deletes what it restored, so the access log and the anchor may be
    deleted too (the other streams already may be, by `rotate-key` and `rebuild`).
    Snapshot chunks are acknowledged as replies (`allow_responses`); a restore sends
    its chunks to the subject the server names, under `$JS.SNAPSHOT.RESTORE.{stream}`."""
    streams = (
        kv_stream(names.secrets_bucket),
        kv_stream(names.state_bucket),
        anchor_stream(names),
        events_stream(names),
        access_stream(names),
    )
    subjects: list[str] = []
    for stream in streams:
        subjects += _api(stream, "SNAPSHOT", "RESTORE")
        subjects.append(f"{JS_SNAPSHOT_RESTORE}.{stream}.>")
    subjects += _api(access_stream(names), "DELETE")
    subjects += _api(anchor_stream(names), "DELETE")
    return subjects


def _admin(names: BackendNames) -> Permissions:
    inbox = f"{inbox_prefix(names, NatsRole.ADMIN)}.>"
    events, access = events_stream(names), access_stream(names)
    staging = staging_stream(names)
    secrets_kv, state_kv = kv_stream(names.secrets_bucket), kv_stream(names.state_bucket)
    lock = rotation_lock_subject(names)
    publish = [
        inbox,
        f"{names.subject_prefix}.>",  # admin requests (put, mappings, list, delete, ...)
        lock,  # rotate-key: who holds the lock?
        # rotate-key rewrites the log and the views; rebuild rewrites the views.
        events_subjects(names),
        staging_subjects(names),
        streams.kv_subjects(names.secrets_bucket),
        streams.kv_subjects(names.state_bucket),
        *_reading(events),  # audit export, rotate-key
        *_api(events, "CREATE", "DELETE", "MSG.GET", "MSG.DELETE", "DIRECT.GET"),
        *_reading(access),  # audit export --access
        # rotate-key re-tags the access log for the new key (each batch again, then erased)
        access_subject(names),
        *_api(access, "MSG.DELETE"),
        # status: every instance's stats; rotate-key --online: the keys each backend
        # holds, and when they switched
        f"{SRV}.STATS.{SERVICE_NAME}",
        f"{SRV}.STATS.{SERVICE_NAME}.*",
        *_api(staging, "INFO", "CREATE", "UPDATE", "DELETE", "MSG.GET", "MSG.DELETE", "DIRECT.GET"),
        # get reads the bucket; rotate-key erases destroyed versions from it
        *_api(secrets_kv, "INFO", "CREATE", "DELETE", "MSG.GET", "MSG.DELETE"),
        *_api(state_kv, "INFO", "CREATE", "DELETE"),
        # import reads the original's buckets whole and marks them as taken over
        *_reading(secrets_kv),
        *_reading(state_kv),
        *_api(secrets_kv, "UPDATE"),
        *_api(state_kv, "UPDATE"),
        # verify, rebuild and rotate-key read the anchor; rotate-key and repair move it
        anchor_subject(names),
        *_api(anchor_stream(names), "INFO", "CREATE", "MSG.GET"),
        *_backup_and_restore(names),
    ]
    subscribe = [inbox, lock]
    unique = tuple(dict.fromkeys(publish))  # a grant two commands need is listed once
    return Permissions(NatsRole.ADMIN, unique, tuple(subscribe), allow_responses=True)


def _host(names: BackendNames) -> Permissions:
    return Permissions(
        NatsRole.HOST,
        publish=(names.subject("server_xkey"), names.subject("get")),
        subscribe=(HOST_INBOXES,),
        allow_responses=False,
    )


def profile(names: BackendNames, role: NatsRole) -> Permissions:
    """The allow-lists of `role` for the backend named by `names`."""
    builders = {NatsRole.BACKEND: _backend, NatsRole.ADMIN: _admin, NatsRole.HOST: _host}
    return builders[role](names)


def profiles(names: BackendNames) -> dict[NatsRole, Permissions]:
    return {role: profile(names, role) for role in NatsRole}
