"""JetStream, once: every raw `$JS.API` request, its error codes and its header names.

The event log, the KV views, the access log, `rotate-key`, `rebuild` and the benchmarks
all talk to JetStream through here, so a stream is created, read, erased and deleted one
way, a JetStream error code means one exception class everywhere (`api_error`), and
`to_backend_error` is the one place that turns a nats-py exception into the project's
error tree.
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
from nats.js import api

from secrets_nats_kv.errors import NatsUnavailable, StorageError
from secrets_nats_kv.nats import refusals

# --- header names JetStream reads or writes -----------------------------------------------

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SEQUENCE_HEADER = "Nats-Expected-Last-Sequence"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
KV_OPERATION_HEADER = "KV-Operation"
KV_DELETE = "DEL"  # the KV-Operation of a delete marker
STATUS_HEADER = "Status"  # a direct get's end-of-batch or not-found reply
SEQUENCE_HEADER = "Nats-Sequence"  # a direct get's stream sequence
NUM_PENDING_HEADER = "Nats-Num-Pending"  # only in batched direct get replies

# --- error codes (JetStream's err_code) ---------------------------------------------------

NO_SUITABLE_PEERS = 10005  # "no suitable peers for placement": a cluster still forming
CLUSTER_NOT_AVAILABLE = 10008  # "JetStream system temporarily unavailable": no meta leader
NO_MESSAGE_FOUND = 10037
DELETE_FAILED = 10043  # generic: "... not found" in its description means already gone
SEQUENCE_NOT_FOUND = 10057
STREAM_NAME_IN_USE = 10058  # a stream of that name exists with another configuration
STREAM_NOT_FOUND = 10059
WRONG_LAST_SEQUENCE = 10071  # a failed `Nats-Expected-Last-Sequence` check


class JetStreamError(StorageError):
    """JetStream refused a request; `err_code` says why (0 when it gave none)."""

    def __init__(self, what: str, why: str, err_code: int = 0) -> None:
        super().__init__(what, why)
        self.err_code = err_code


class StreamNotFound(JetStreamError):
    """There is no stream of that name."""


class StreamNameInUse(JetStreamError):
    """A stream of that name already exists (with another configuration)."""


class MessageNotFound(JetStreamError):
    """No message at that sequence (never written, or erased)."""


class WrongLastSequence(JetStreamError):
    """A pinned publish found its position taken: the stream moved on."""


_BY_CODE: dict[int, type[JetStreamError]] = {
    NO_MESSAGE_FOUND: MessageNotFound,
    SEQUENCE_NOT_FOUND: MessageNotFound,
    STREAM_NAME_IN_USE: StreamNameInUse,
    STREAM_NOT_FOUND: StreamNotFound,
    WRONG_LAST_SEQUENCE: WrongLastSequence,
}


class ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


def api_error(what: str, error: ApiError) -> JetStreamError:
    """The exception for a JetStream error reply (the one code-to-class mapping)."""
    kind = _BY_CODE.get(error.err_code, JetStreamError)
    if error.err_code == DELETE_FAILED and "not found" in error.description:
        kind = MessageNotFound
    return kind(what, error.description or f"error {error.err_code}", error.err_code)


def to_backend_error(what: str, exc: BaseException) -> StorageError | NatsUnavailable:
    """The project's error for a nats-py failure while doing `what`."""
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.NoServersError):
        return NatsUnavailable(f"{what}: NATS connection lost")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return NatsUnavailable(f"{what}: JetStream is not available")
    if isinstance(exc, nats.errors.TimeoutError):
        # In a CLI process, a request the server refused a permission for never gets
        # its reply: the refusal is the news, not the timeout.
        return refusals.refused_in_this_process() or StorageError(what, "timed out")
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code:
        description = exc.description or str(exc)
        return api_error(what, ApiError(exc.code or 0, exc.err_code, description))
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return StorageError(what, str(text))


# --- replies ------------------------------------------------------------------------------


class PubAck(msgspec.Struct, frozen=True):
    """A publish acknowledgement (what a stream answers a publish with a reply subject)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


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
    error: ApiError | None = None


class _SuccessReply(msgspec.Struct):
    success: bool = False
    error: ApiError | None = None


pub_ack_decoder = msgspec.json.Decoder(PubAck)
_info_decoder = msgspec.json.Decoder(_InfoReply)
_success_decoder = msgspec.json.Decoder(_SuccessReply)


# --- requests -----------------------------------------------------------------------------


def _api(verb: str, stream: str) -> str:
    return f"$JS.API.{verb}.{stream}"


def stream_info_subject(stream: str) -> str:
    """Where STREAM.INFO of `stream` is asked (the benchmarks count these requests)."""
    return _api("STREAM.INFO", stream)


def msg_get_subject(stream: str) -> str:
    """Where STREAM.MSG.GET of `stream` is asked (its leader answers: never a replica behind)."""
    return _api("STREAM.MSG.GET", stream)


def direct_get_subject(stream: str) -> str:
    """Where batched direct gets of `stream` are asked (any replica answers)."""
    return _api("DIRECT.GET", stream)


async def api_request(
    nc: NATS,
    subject: str,
    payload: bytes,
    api_timeout: float,
    headers: dict[str, str] | None = None,
) -> bytes:
    """One request and its reply's bytes, NATS failures as the project's errors."""
    try:
        msg = await refusals.request(
            nc, subject, payload, reply_within=api_timeout, headers=headers
        )
    except nats.errors.Error as exc:
        raise to_backend_error(subject, exc) from None
    return msg.data


async def stream_info(nc: NATS, stream: str, api_timeout: float) -> StreamInfo | None:
    """One STREAM.INFO request (counters, replicas, metadata); None if there is no such stream."""
    data = await api_request(nc, stream_info_subject(stream), b"", api_timeout)
    reply = _info_decoder.decode(data)
    if reply.error is not None:
        if reply.error.err_code == STREAM_NOT_FOUND:
            return None
        raise api_error(f"stream {stream}", reply.error)
    if reply.state is None:
        raise StorageError(f"stream {stream}", "no state in reply")
    return StreamInfo(config=reply.config or StreamSettings(), state=reply.state)


async def stream_state(nc: NATS, stream: str, api_timeout: float) -> StreamState:
    """The counters of a stream that must exist (a missing one is `StreamNotFound`)."""
    info = await stream_info(nc, stream, api_timeout)
    if info is None:
        raise StreamNotFound(f"stream {stream}", "stream not found", STREAM_NOT_FOUND)
    return info.state


async def erase_message(
    nc: NATS, stream: str, seq: int, api_timeout: float, *, overwrite: bool = True
) -> None:
    """Overwrite and remove one stream message; a message already gone is fine.

    `overwrite=False` only removes it (cheaper for the server: for strangers' junk,
    which holds nothing to shred)."""
    payload = msgspec.json.encode({"seq": seq, "no_erase": not overwrite})
    data = await api_request(nc, _api("STREAM.MSG.DELETE", stream), payload, api_timeout)
    reply = _success_decoder.decode(data)
    if reply.error is None:
        return
    error = api_error(f"erase {stream} #{seq}", reply.error)
    if isinstance(error, MessageNotFound):
        return
    if reply.error.code == 404 and reply.error.err_code != DELETE_FAILED:
        return
    raise error


async def delete_stream(nc: NATS, stream: str, api_timeout: float) -> None:
    """Delete a whole stream; one already gone is fine."""
    data = await api_request(nc, _api("STREAM.DELETE", stream), b"", api_timeout)
    reply = _success_decoder.decode(data)
    if reply.error is None or reply.error.err_code == STREAM_NOT_FOUND:
        return
    raise api_error(f"delete stream {stream}", reply.error)


async def stored_message(
    nc: NATS, stream: str, seq: int, api_timeout: float
) -> api.RawStreamMsg | None:
    """The message stored at `seq` (subject, headers, data), or None if there is none."""
    try:
        return await nc.jetstream(timeout=api_timeout).get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    except nats.errors.Error as exc:
        raise to_backend_error(f"{stream} #{seq}", exc) from None


class HeadReader:
    """Reads a stream's last sequence with STREAM.INFO, and notices answers from strangers.

    On an open bus anyone subscribed to `$JS.API.>` sees the request and can answer it.
    JetStream answers each request once, so every answer after the first to the same
    request is counted in `extra_answers`: the sign that someone forges. `read()`
    returns once an answer of at least `at_least` arrived (lower ones are kept, but not
    waited on: the caller knows them to be lies), with every other head answered within
    `grace` after it, so that the server's own answer is among them.

    "No such stream" is an answer too: if no head arrives within `missing_grace` after
    it, `read()` raises `StreamNotFound` (a stream deleted under the reader). A stranger
    who forges that answer on an open bus could as well delete the stream: the grace is
    for JetStream's own answer to outvote a forger's, not a defence of the open bus.
    """

    _KEEP = 256  # recent requests whose late answers still count as extra
    missing_grace = 0.25  # after "no such stream": how long a head may still arrive

    def __init__(self, nc: NATS, stream: str, api_timeout: float) -> None:
        self._nc = nc
        self._subject = f"$JS.API.STREAM.INFO.{stream}"
        self._inbox = nc.new_inbox()
        self._timeout = api_timeout
        self._next = 0
        self._answers: dict[int, list[int]] = {}
        self._arrived: dict[int, anyio.Event] = {}
        self._floor: dict[int, int] = {}
        self._missing: dict[int, bool] = {}  # request -> "no such stream" was answered
        self._sub: Subscription | None = None
        self.extra_answers = 0

    async def read(self, grace: float = 0.0, at_least: int = 0) -> list[int]:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_answer)
            except nats.errors.Error as exc:
                raise to_backend_error(self._subject, exc) from None
        self._next += 1
        n = self._next
        self._answers[n], self._arrived[n], self._floor[n] = [], anyio.Event(), at_least
        self._missing[n] = False
        for old in (self._answers, self._arrived, self._floor, self._missing):
            old.pop(n - self._KEEP, None)
        try:
            await self._nc.publish(self._subject, b"", reply=f"{self._inbox}.{n}")
        except nats.errors.Error as exc:
            raise to_backend_error(self._subject, exc) from None
        with anyio.move_on_after(self._timeout):
            await self._arrived[n].wait()
        if not self._arrived[n].is_set():
            raise StorageError(self._subject, "timed out")
        if self._missing[n] and not self._answers[n]:
            await anyio.sleep(self.missing_grace)  # JetStream's head would outvote it
            if not self._answers[n]:
                raise StreamNotFound(self._subject, "stream not found", STREAM_NOT_FOUND)
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
        if answers is None:
            return
        if reply.error is not None and reply.error.err_code == STREAM_NOT_FOUND:
            if answers or self._missing[n]:
                self.extra_answers += 1  # JetStream answers once
            self._missing[n] = True
            self._arrived[n].set()
            return
        if reply.state is None or reply.error is not None:
            return
        if answers or self._missing[n]:
            self.extra_answers += 1  # JetStream answers once
        answers.append(reply.state.last_seq)
        if reply.state.last_seq >= self._floor[n]:
            self._arrived[n].set()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
