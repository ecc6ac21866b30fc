"""Reading what the server stores, byte for byte, for the tests that check bytes at rest.

Destroy is a promise about bytes, so tests look at bytes: every message of a stream, the
sealed value at a bucket revision, and any encoding a store could hold them in.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import RawStreamMsg

from events.log import EventLog, LogEntry
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.nats.jetstream import stream_state
from support.harness import Keys

SECRETS_KV = "KV_WASMCLOUD_SECRETS"
STATE_KV = "KV_SECRETS_nats-kv_state"


async def messages_in(nc: NATS, stream: str) -> list[RawStreamMsg]:
    """Every message still in `stream`, read one by one through the JetStream API."""
    js = nc.jetstream(timeout=5)
    state = await stream_state(nc, stream, 5.0)
    found = []
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            found.append(await js.get_msg(stream, seq=seq))
        except nats.js.errors.NotFoundError:
            continue  # erased or deleted
    return found


def message_bytes(message: RawStreamMsg) -> bytes:
    headers = b"".join(f"{k}:{v}\n".encode() for k, v in (message.headers or {}).items())
    return (message.subject or "").encode() + b"\n" + headers + (message.data or b"")


def encodings(data: bytes) -> list[bytes]:
    """`data` as a store could hold it: raw, hex, or inside any base64 text at any offset."""
    forms = [data, data.hex().encode()]
    for shift in range(3):  # base64 of a larger blob contains one of these three alignments
        chunk = data[shift:]
        chunk = chunk[: len(chunk) // 3 * 3]
        forms += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return forms


def contains_any(haystack: bytes, needles: Iterable[bytes]) -> bool:
    return any(needle in haystack for needle in needles)


def files_holding(directory: Path, data: bytes) -> list[str]:
    """The files under `directory` holding `data` in any of its encodings."""
    forms = encodings(data)
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and contains_any(path.read_bytes(), forms)
    )


async def messages_holding(nc: NATS, stream: str, data: bytes) -> list[int]:
    forms = encodings(data)
    found = await messages_in(nc, stream)
    return [m.seq or 0 for m in found if contains_any(message_bytes(m), forms)]


async def sealed_at(nc: NATS, revision: int) -> bytes:
    """The sealed bytes the secrets bucket holds at `revision` (what a version is at rest)."""
    message = await nc.jetstream(timeout=5).get_msg(SECRETS_KV, seq=revision)
    assert message.data
    return message.data


def event_log(nc: NATS, keys: Keys) -> EventLog:
    return EventLog(nc, backend_name="nats-kv", barrier=Barrier(keys.encryption))


async def log_entries(nc: NATS, keys: Keys) -> list[LogEntry]:
    return await event_log(nc, keys).read_all()
