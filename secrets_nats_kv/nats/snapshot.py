"""JetStream's stream snapshot and restore API, raw: what `backup` and `restore` stand on.

A snapshot is the stream's own store (messages, sequence numbers, deleted and erased
sequences, and the config) as an opaque s2-compressed tar the server streams to us in
chunks; a restore hands those bytes back and the server rebuilds the stream exactly,
at the same sequences. That exactness is why backups use it: event tags commit to their
positions in the log, and versions are KV revisions, so a re-published copy at new
sequences would be a different (and, to every instance, a forged) log.

Flow control, as the server speaks it: each snapshot chunk carries a reply subject we
must answer before the server sends more than its window; an empty message with a
`Status: 204` header ends the snapshot (any other status is a failure). A restore sends
each chunk as a request the server acknowledges, then an empty request, whose reply is
the restored stream's info.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import api_request, to_backend_error

SNAPSHOT_API = "$JS.API.STREAM.SNAPSHOT.{stream}"
RESTORE_API = "$JS.API.STREAM.RESTORE.{stream}"
STATUS_HEADER = "Status"
END_OF_SNAPSHOT = "204"
CHUNK_SIZE = 128 * 1024
_RESTORE_CHUNK = 64 * 1024
_CHUNK_TIMEOUT_S = 30.0
_FINAL_TIMEOUT_S = 600.0  # the server rebuilds the stream before it answers the last request


def _reply(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise StorageError(what, "the server's reply is not JSON") from None
    if not isinstance(value, dict):
        raise StorageError(what, "the server's reply is not an object")
    error = value.get("error")
    if isinstance(error, dict):
        raise StorageError(what, str(error.get("description") or error.get("code")))
    return value


async def snapshot(
    nc: NATS,
    stream: str,
    *,
    api_timeout: float = 5.0,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
    """Start a snapshot: the stream's `{config, state}` and an iterator over its chunks."""
    what = f"snapshot {stream}"
    inbox = nc.new_inbox()
    send, receive = anyio.create_memory_object_stream[Msg](1024)
    sub = await nc.subscribe(inbox, cb=send.send)
    request = msgspec.json.encode(
        {"deliver_subject": inbox, "no_consumers": True, "chunk_size": CHUNK_SIZE}
    )
    try:
        head = _reply(
            await api_request(nc, SNAPSHOT_API.format(stream=stream), request, api_timeout), what
        )
    except BaseException:
        await sub.unsubscribe()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async with receive:
                while True:
                    with anyio.fail_after(_CHUNK_TIMEOUT_S):
                        msg = await receive.receive()
                    if not msg.data:
                        status = (msg.headers or {}).get(STATUS_HEADER, END_OF_SNAPSHOT)
                        if END_OF_SNAPSHOT not in status:
                            raise StorageError(what, f"the server ended it with status {status}")
                        return
                    if msg.reply:
                        await nc.publish(msg.reply, b"")
                    if on_bytes is not None:
                        on_bytes(len(msg.data))
                    yield msg.data
        except TimeoutError:
            raise StorageError(what, f"no chunk for {_CHUNK_TIMEOUT_S:g}s") from None
        except nats.errors.Error as exc:
            raise to_backend_error(what, exc) from None
        finally:
            send.close()
            await sub.unsubscribe()

    return head, chunks()


async def restore(
    nc: NATS,
    request: dict[str, Any],
    data: bytes,
    *,
    api_timeout: float = 5.0,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Restore one stream from its snapshot `data`; the restored stream's info."""
    stream = str(request["config"]["name"])
    what = f"restore {stream}"
    head = _reply(
        await api_request(
            nc, RESTORE_API.format(stream=stream), msgspec.json.encode(request), api_timeout
        ),
        what,
    )
    deliver = head.get("deliver_subject")
    if not isinstance(deliver, str):
        raise StorageError(what, "the server gave no subject to send the snapshot to")
    try:
        for start in range(0, len(data), _RESTORE_CHUNK):
            chunk = data[start : start + _RESTORE_CHUNK]
            ack = await nc.request(deliver, chunk, timeout=_CHUNK_TIMEOUT_S)
            if ack.data:
                _reply(ack.data, what)
            if on_bytes is not None:
                on_bytes(len(chunk))
        final = await nc.request(deliver, b"", timeout=_FINAL_TIMEOUT_S)
    except nats.errors.Error as exc:
        raise to_backend_error(what, exc) from None
    return _reply(final.data, what)
