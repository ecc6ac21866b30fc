"""The few raw JetStream API calls the backend makes, with NATS errors converted.

The event log and the KV views both need a stream's last sequence (cheaply, on hot
paths) and a secure message erase; they live here once. `convert` is the one place that
turns a nats-py exception into the project's error tree.
"""

from __future__ import annotations

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv.errors import NatsUnavailable, StorageError

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code for a failed expected-sequence check
STREAM_NOT_FOUND = 10059
_MESSAGE_NOT_FOUND = (10037, 10043, 10057)  # no message, sequence not found, deleted


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class StreamState(msgspec.Struct, frozen=True):
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0


class StreamSettings(msgspec.Struct, frozen=True):
    """The part of a stream's config the tools read back (replicas, metadata)."""

    num_replicas: int = 1
    metadata: dict[str, str] | None = None


class StreamInfo(msgspec.Struct, frozen=True):
    config: StreamSettings = StreamSettings()
    state: StreamState = StreamState()


class _InfoReply(msgspec.Struct):
    config: StreamSettings | None = None
    state: StreamState | None = None
    error: _ApiError | None = None


class _DeleteReply(msgspec.Struct):
    success: bool = False
    error: _ApiError | None = None


_info_decoder = msgspec.json.Decoder(_InfoReply)
_delete_decoder = msgspec.json.Decoder(_DeleteReply)


def convert(what: str, exc: BaseException) -> StorageError | NatsUnavailable:
    """The project's error for a nats-py failure while doing `what`."""
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.NoServersError):
        return NatsUnavailable(f"{what}: NATS connection lost")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return NatsUnavailable(f"{what}: JetStream is not available")
    if isinstance(exc, nats.errors.TimeoutError):
        return StorageError(what, "timed out")
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return StorageError(what, str(text))


async def api_request(nc: NATS, subject: str, payload: bytes, api_timeout: float) -> bytes:
    try:
        msg = await nc.request(subject, payload, timeout=api_timeout)
    except nats.errors.Error as exc:
        raise convert(subject, exc) from None
    return msg.data


async def stream_info(nc: NATS, stream: str, api_timeout: float) -> StreamInfo | None:
    """One STREAM.INFO request (counters, replicas, metadata); None if there is no such stream."""
    data = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", b"", api_timeout)
    reply = _info_decoder.decode(data)
    if reply.error is not None:
        if reply.error.err_code == STREAM_NOT_FOUND:
            return None
        raise StorageError(f"stream {stream}", reply.error.description)
    if reply.state is None:
        raise StorageError(f"stream {stream}", "no state in reply")
    return StreamInfo(config=reply.config or StreamSettings(), state=reply.state)


async def stream_state(nc: NATS, stream: str, api_timeout: float) -> StreamState:
    """The counters of a stream that must exist (a missing one is a `StorageError`)."""
    info = await stream_info(nc, stream, api_timeout)
    if info is None:
        raise StorageError(f"stream {stream}", "stream not found")
    return info.state


async def erase_message(nc: NATS, stream: str, seq: int, api_timeout: float) -> None:
    """Overwrite and remove one stream message; a message already gone is fine."""
    payload = msgspec.json.encode({"seq": seq, "no_erase": False})
    data = await api_request(nc, f"$JS.API.STREAM.MSG.DELETE.{stream}", payload, api_timeout)
    reply = _delete_decoder.decode(data)
    if reply.error is None:
        return
    # 10043 is JetStream's generic "delete failed": only "… not found" means already gone.
    gone = reply.error.code == 404 or reply.error.err_code in _MESSAGE_NOT_FOUND
    if gone and (reply.error.err_code != 10043 or "not found" in reply.error.description):
        return
    raise StorageError(f"erase {stream} #{seq}", reply.error.description)


async def delete_stream(nc: NATS, stream: str, api_timeout: float) -> None:
    """Delete a whole stream; one already gone is fine."""
    data = await api_request(nc, f"$JS.API.STREAM.DELETE.{stream}", b"", api_timeout)
    reply = _delete_decoder.decode(data)
    if reply.error is None or reply.error.err_code == STREAM_NOT_FOUND:
        return
    raise StorageError(f"delete stream {stream}", reply.error.description)
