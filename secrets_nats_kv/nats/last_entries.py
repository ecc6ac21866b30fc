"""The last entry on each of several subjects of a stream, in one batched direct get.

A get behind the event log's head asks this for the subjects its answer depends on
(`projections.freshness`). The request and its reply headers are JetStream's (named in
`secrets_nats_kv.nats.jetstream`); what is here is reading them on a bus where anyone
may answer.
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
    END_OF_BATCH,
    NOTHING_FOUND,
    SEQUENCE_HEADER,
    STATUS_HEADER,
    SUBJECT_HEADER,
    UP_TO_SEQUENCE_HEADER,
    direct_get_subject,
    to_backend_error,
)


@dataclass(slots=True)
class LastSequences:
    """What one read of the last message on several subjects heard.

    `seqs`: the highest sequence answered for each subject asked (a subject with nothing
    up to the sequence asked is absent). JetStream ends its answer once: `ends` counts
    the ends heard (an end-of-batch or a "nothing found"), `covered` is the highest
    sequence an end-of-batch says the read went up to, `nothing` whether some answer
    said "nothing found" (also JetStream's answer when asked past its last sequence: a
    replica behind), `refused` a status other than those two, and `odd` the answers
    JetStream never gives (a subject not asked, one subject twice, a reply after the end).
    """

    seqs: dict[str, int] = field(default_factory=dict)
    ends: int = 0
    covered: int = 0
    nothing: bool = False
    refused: str = ""
    odd: int = 0


class LastSequenceReader:
    """Reads the last sequence on several subjects of a stream in one batched direct get.

    The request is `{"multi_last": subjects, "up_to_seq": n, "batch": len(subjects)}`
    (nats-server 2.11+, a stream with `allow_direct`): one reply per subject that has a
    message up to `n` (headers `Nats-Subject`, `Nats-Sequence`), then an end-of-batch
    status 204 whose `Nats-UpTo-Sequence` is `n`; "404" if none has, or if the replica
    answering holds fewer than `n` messages. As `HeadReader` does for STREAM.INFO, it
    counts answers that cannot be JetStream's in `extra_answers`, late ones included:
    on an open bus anyone may answer. `read()` returns at the first end, `grace` later.
    """

    _KEEP = 256  # recent requests whose late answers still count as extra

    def __init__(self, nc: NATS, stream: str, api_timeout: float) -> None:
        self._nc = nc
        self._subject = direct_get_subject(stream)
        self._inbox = nc.new_inbox()
        self._timeout = api_timeout
        self._next = 0
        self._reads: dict[int, tuple[frozenset[str], LastSequences, anyio.Event]] = {}
        self._sub: Subscription | None = None
        self.extra_answers = 0

    async def read(
        self, subjects: tuple[str, ...], up_to: int, grace: float = 0.0
    ) -> LastSequences:
        if self._sub is None:
            try:
                self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_answer)
            except nats.errors.Error as exc:
                raise to_backend_error(self._subject, exc) from None
        self._next += 1
        n = self._next
        heard, ended = LastSequences(), anyio.Event()
        self._reads[n] = (frozenset(subjects), heard, ended)
        self._reads.pop(n - self._KEEP, None)
        request = {"multi_last": list(subjects), "up_to_seq": up_to, "batch": len(subjects)}
        try:
            await self._nc.publish(
                self._subject, msgspec.json.encode(request), reply=f"{self._inbox}.{n}"
            )
        except nats.errors.Error as exc:
            raise to_backend_error(self._subject, exc) from None
        with anyio.move_on_after(self._timeout):
            await ended.wait()
        if not ended.is_set():
            raise StorageError(self._subject, "timed out")
        if grace > 0:
            await anyio.sleep(grace)  # a window for the other answers, by design
        return LastSequences(
            dict(heard.seqs), heard.ends, heard.covered, heard.nothing, heard.refused, heard.odd
        )

    async def _on_answer(self, msg: Msg) -> None:
        try:
            read = self._reads.get(int(msg.subject.rsplit(".", 1)[1]))
        except ValueError:
            read = None
        if read is None:
            return
        asked, heard, ended = read
        headers = msg.headers or {}
        status = headers.get(STATUS_HEADER)
        if heard.ends:
            heard.odd += 1  # JetStream says nothing after its end
            self.extra_answers += 1
        if status is not None:
            heard.ends += 1
            if status == END_OF_BATCH:
                heard.covered = max(heard.covered, _int(headers.get(UP_TO_SEQUENCE_HEADER)))
            elif status == NOTHING_FOUND:
                heard.nothing = True
            else:
                heard.refused = status
            ended.set()
            return
        subject, seq = headers.get(SUBJECT_HEADER, ""), _int(headers.get(SEQUENCE_HEADER))
        if subject not in asked or subject in heard.seqs or seq <= 0:
            if not heard.ends:  # counted once per answer
                heard.odd += 1
                self.extra_answers += 1
            if subject not in asked or seq <= 0:
                return
        heard.seqs[subject] = max(heard.seqs.get(subject, 0), seq)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
