"""The few raw JetStream API calls the backend makes, with NATS errors converted.

The event log and the KV views both need a stream's last sequence (cheaply, on hot
paths) and a secure message erase; they live here once. `convert` is the one place that
turns a nats-py exception into the project's error tree.
"""

from __future__ import annotations

import contextlib

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from secrets_nats_kv.errors import NatsUnavailable, StorageError

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code for a failed expected-sequence check
_MESSAGE_NOT_FOUND = (10037, 10043, 10057)  # no message, sequence not found, deleted


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class StreamState(msgspec.Struct, frozen=True):
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0


class _InfoReply(msgspec.Struct):
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


async def stream_state(nc: NATS, stream: str, api_timeout: float) -> StreamState:
    """One STREAM.INFO request, decoding only the counters."""
    data = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", b"", api_timeout)
    reply = _info_decoder.decode(data)
    if reply.error is not None or reply.state is None:
        why = reply.error.description if reply.error else "no state in reply"
        raise StorageError(f"stream {stream}", why)
    return reply.state


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


class HeadReader:
    """Reads a stream's last sequence with STREAM.INFO, and notices answers from strangers.

    On an open bus anyone subscribed to `$JS.API.>` sees the request and can answer it.
    JetStream answers each request once, so every answer after the first to the same
    request is counted in `extra_answers`: the sign that someone forges. `read()`
    returns once an answer of at least `at_least` arrived (lower ones are kept, but not
    waited on: the caller knows them to be lies), with every other head answered within
    `grace` after it, so that the server's own answer is among them.
    """

    _KEEP = 256  # recent requests whose late answers still count as extra

    def __init__(self, nc: NATS, stream: str, api_timeout: float) -> None:
        self._nc = nc
        self._subject = f"$JS.API.STREAM.INFO.{stream}"
        self._inbox = nc.new_inbox()
        self._timeout = api_timeout
        self._next = 0
        self._answers: dict[int, list[int]] = {}
        self._arrived: dict[int, anyio.Event] = {}
        self._floor: dict[int, int] = {}
        self._sub: Subscription | None = None
        self.extra_answers = 0

    async def read(self, grace: float = 0.0, at_least: int = 0) -> list[int]:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_answer)
            except nats.errors.Error as exc:
                raise convert(self._subject, exc) from None
        self._next += 1
        n = self._next
        self._answers[n], self._arrived[n], self._floor[n] = [], anyio.Event(), at_least
        for old in (self._answers, self._arrived, self._floor):
            old.pop(n - self._KEEP, None)
        try:
            await self._nc.publish(self._subject, b"", reply=f"{self._inbox}.{n}")
        except nats.errors.Error as exc:
            raise convert(self._subject, exc) from None
        with anyio.move_on_after(self._timeout):
            await self._arrived[n].wait()
        if not self._arrived[n].is_set():
            raise StorageError(self._subject, "timed out")
        if grace > 0:
            await anyio.sleep(grace)  # a window for the other answers, by design
        return list(self._answers[n])

    async def _on_answer(self, msg: Msg) -> None:
        try:
            n = int(msg.subject.rsplit(".", 1)[1])
            reply = _info_decoder.decode(msg.data)
        except (ValueError, msgspec.DecodeError):
            self.extra_answers += 1  # not stream info: not JetStream's
            return
        answers = self._answers.get(n)
        if answers is None or reply.state is None or reply.error is not None:
            return
        if answers:
            self.extra_answers += 1  # JetStream answers once
        answers.append(reply.state.last_seq)
        if reply.state.last_seq >= self._floor[n]:
            self._arrived[n].set()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
