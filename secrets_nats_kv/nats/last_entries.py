"""The last entry on each of several subjects of a stream, read from its leader.

A get behind the event log's head asks this for the subjects its answer depends on
(`projections.freshness`): one `STREAM.MSG.GET` with `last_by_subj` per subject, all
sent at once. Not the batched direct get (`multi_last`), though one request would do:
any replica answers a direct get (one behind the leader would name an older entry),
and under a flood of writes nats-server 2.15 left direct gets unanswered for seconds
while it still answered STREAM.INFO and MSG.GET (bench_abuse). The request, the reply
and the error code are JetStream's (named in `secrets_nats_kv.nats.jetstream`); what is
here is reading them on a bus where anyone may answer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import (
    NO_MESSAGE_FOUND,
    ApiError,
    msg_get_subject,
    to_backend_error,
)


@dataclass(slots=True)
class LastSequences:
    """What one read of the last entry on several subjects heard.

    `seqs`: the highest sequence answered for each subject asked (absent: no entry on
    it). JetStream answers each request once: `extra` counts the answers it never gives
    (a second one to a request, one naming another subject, one that is no reply of its
    own), `refused` the first error other than "no message" (then nothing is vouched for).
    """

    seqs: dict[str, int] = field(default_factory=dict)
    extra: int = 0
    refused: str = ""


class _Stored(msgspec.Struct):
    subject: str = ""
    seq: int = 0


class _Reply(msgspec.Struct):
    message: _Stored | None = None
    error: ApiError | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


class _Read:
    __slots__ = ("answered", "done", "heard", "subjects")

    def __init__(self, subjects: tuple[str, ...]) -> None:
        self.subjects = subjects
        self.heard = LastSequences()
        self.answered: set[int] = set()
        self.done = anyio.Event()


class LastSequenceReader:
    """Reads the last sequence on several subjects; notices answers from strangers.

    As `HeadReader` does for STREAM.INFO, every answer JetStream would not give is
    counted in `extra_answers`, late ones included. `read()` returns once every subject
    was answered, `grace` later (a window for rivals' answers once strangers are known).
    """

    _KEEP = 256  # recent reads whose late answers still count as extra

    def __init__(self, nc: NATS, stream: str, api_timeout: float) -> None:
        self._nc = nc
        self._subject = msg_get_subject(stream)
        self._inbox = nc.new_inbox()
        self._timeout = api_timeout
        self._next = 0
        self._reads: dict[int, _Read] = {}
        self._sub: Subscription | None = None
        self.extra_answers = 0

    async def read(self, subjects: tuple[str, ...], grace: float = 0.0) -> LastSequences:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(f"{self._inbox}.*.*", cb=self._on_answer)
            except nats.errors.Error as exc:
                raise to_backend_error(self._subject, exc) from None
        self._next += 1
        n = self._next
        read = self._reads[n] = _Read(subjects)
        self._reads.pop(n - self._KEEP, None)
        try:
            for i, subject in enumerate(subjects):
                request = msgspec.json.encode({"last_by_subj": subject})
                await self._nc.publish(self._subject, request, reply=f"{self._inbox}.{n}.{i}")
        except nats.errors.Error as exc:
            raise to_backend_error(self._subject, exc) from None
        with anyio.move_on_after(self._timeout):
            await read.done.wait()
        if not read.done.is_set():
            raise StorageError(self._subject, "timed out")
        if grace > 0:
            await anyio.sleep(grace)  # a window for the other answers, by design
        heard = read.heard
        return LastSequences(dict(heard.seqs), heard.extra, heard.refused)

    async def _on_answer(self, msg: Msg) -> None:
        try:
            _, n, i = msg.subject.rsplit(".", 2)
            read, index = self._reads.get(int(n)), int(i)
            reply = _reply_decoder.decode(msg.data)
        except (ValueError, msgspec.DecodeError):
            read, index, reply = None, -1, _Reply()
            self.extra_answers += 1  # not a MSG.GET reply: not JetStream's
        if read is None or not 0 <= index < len(read.subjects):
            return
        heard, subject = read.heard, read.subjects[index]
        if index in read.answered:
            heard.extra += 1  # JetStream answers once
            self.extra_answers += 1
        read.answered.add(index)
        if reply.message is not None:
            if reply.message.subject != subject:
                heard.extra += 1  # JetStream answers what was asked
                self.extra_answers += 1
            else:
                heard.seqs[subject] = max(heard.seqs.get(subject, 0), reply.message.seq)
        elif reply.error is not None and reply.error.err_code != NO_MESSAGE_FOUND:
            heard.refused = heard.refused or (reply.error.description or str(reply.error.code))
        if len(read.answered) == len(read.subjects):
            read.done.set()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
