"""How fresh a read must be: the log's head, and the part of it one get depends on.

A get must never be served from a state older than a write acknowledged before it
arrived. The live view reads the log's head after the request arrived (one STREAM.INFO
shared by everyone waiting, `HeadReads`) and, when it has folded that far, serves at
once: the common case costs nothing more. Behind the head, waiting for all of it would
make every get pay for whatever sits in between, junk included (a flood on one of the
log's subjects is stored, and folding it takes longer than storing it). So a get behind
the head asks JetStream for the last entry on the subjects its answer depends on
(`depends_on`; one leader-answered MSG.GET each, sent at once: `SubjectReads`) and
waits only for the highest, capped at the head.

What a get answers: whether the entity is mapped to the secret (the entity's mapping
events, `mapping.{entity}`), the secret's newest or pinned version (every put, delete,
undelete and destroy of it, `secret.{name}`; a version's number is fixed when its event
is folded, so events of other secrets never change it), and, conservatively, the
log's own records (`key`: rotations, fences and repairs; `import`). The fold is applied
in log order, so once the view has folded past the last entry on those subjects its
answer is the one the head would give. A name that cannot be a subject token, or a read
that fails or is refused, falls back to waiting for the whole head.

The bus is hostile: anyone may answer a `$JS.API` request. An answer that is no plain
lie (none, or one below what the view already folded on that subject) and is the only
one heard is taken; otherwise strangers answer too: the incident is
reported once more and from then on every read gathers its rivals for a moment and
takes the highest, so JetStream's own answer counts. A sequence too high only makes a
get wait (never past the head, and at most the freshness timeout); a lower one cannot
hide JetStream's, bar a write acknowledged in that moment while a forger answers first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio

from events.log import IMPORT_SUFFIX, KEY_SUFFIX, mapping_subject, secret_subject
from secrets_nats_kv.errors import InvalidSecretName
from secrets_nats_kv.naming import validate_secret_name
from secrets_nats_kv.nats.last_entries import LastSequences


class HeadRound:
    """One shared head read: every request that joined before it was sent waits on it."""

    __slots__ = ("done", "error", "head")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.head = 0
        self.error: Exception | None = None


class ForgedAnswers:
    """Answers to the view's `$JS.API` requests from someone other than JetStream."""

    def __init__(self, report: Callable[[str], object] | None) -> None:
        self._report = report
        self.seen = 0  # reads that heard a forged answer
        self.grace = 0.02  # once forged answers were seen: how long to wait for more

    def note(self, detail: str) -> None:
        self.seen += 1
        if self._report is not None:
            self._report(f"{detail}: someone other than JetStream answers $JS.API requests")


class HeadSource(Protocol):
    extra_answers: int

    async def read(self, grace: float = 0.0, at_least: int = 0) -> list[int]: ...


class LastSource(Protocol):
    extra_answers: int

    async def read(self, subjects: tuple[str, ...], grace: float = 0.0) -> LastSequences: ...


class HeadReads:
    """The log's head, not to be fooled by strangers answering for JetStream.

    An answer below what the view has applied is a lie (the log never shrinks under a
    running view), and two answers to one request mean someone else answers too: either
    way the read is repeated, from then on waiting for an answer that is no plain lie,
    gathering its rivals for a moment and taking the highest.
    """

    def __init__(
        self,
        open_reader: Callable[[], HeadSource],
        forged: ForgedAnswers,
        applied: Callable[[], int],
    ) -> None:
        self._open = open_reader
        self._reader: HeadSource | None = None
        self._forged = forged
        self._applied = applied
        self._extra_seen = 0  # the reader's count of extra answers when last looked at

    async def read(self) -> int:
        reader = self._reader
        if reader is None:
            reader = self._reader = self._open()
        for _ in range(2):
            gathering = self._forged.seen > 0
            applied = self._applied()
            if gathering:  # wait for an answer that is not a plain lie, and its rivals
                answers = await reader.read(self._forged.grace, at_least=applied)
            else:
                answers = await reader.read()
            late, self._extra_seen = reader.extra_answers > self._extra_seen, reader.extra_answers
            if not late and len(answers) == 1 and answers[0] >= applied:
                return answers[0]
            self._forged.note(
                f"{len(answers)} answer(s) to one STREAM.INFO (heads {sorted(set(answers))[:4]}, "
                f"view at {applied})"
            )
            if gathering and max(answers) >= applied:
                return max(answers)
        return applied  # only lies were heard: nothing newer than the view is known


def depends_on(prefix: str, secret: str, entity: str) -> tuple[str, ...] | None:
    """The log subjects whose entries can change what a get of `secret` by `entity`
    answers, or None if they cannot be named (then the get waits for the whole head)."""
    try:
        validate_secret_name(secret)
    except InvalidSecretName:
        return None
    if not entity or not entity.isalnum():  # an nkey: one plain subject token
        return None
    return (
        secret_subject(prefix, secret),
        mapping_subject(prefix, entity),
        f"{prefix}.{KEY_SUFFIX}",
        f"{prefix}.{IMPORT_SUFFIX}",
    )


class SubjectReads:
    """How far the view must fold for one get: the last entry on the subjects it reads."""

    def __init__(self, open_reader: Callable[[], LastSource], forged: ForgedAnswers) -> None:
        self._open = open_reader
        self._reader: LastSource | None = None
        self._forged = forged
        self._extra_seen = 0
        self.narrowed = 0  # gets that waited for less than the head (bench, tests)

    async def target(
        self, subjects: tuple[str, ...], head: int, folded: Callable[[str], int]
    ) -> int:
        """The position to wait for: the last entry on `subjects`, at most `head` (read
        after the get arrived: a later write on them need not be waited for, and an
        answer above it may be a stranger's), or `head` when nothing can be vouched for.
        `folded(subject)`: the last entry of ours on it the view has folded."""
        reader = self._reader
        if reader is None:
            reader = self._reader = self._open()
        for _ in range(2):
            gathering = self._forged.seen > 0
            heard = await reader.read(subjects, self._forged.grace if gathering else 0.0)
            late, self._extra_seen = reader.extra_answers > self._extra_seen, reader.extra_answers
            # The log never loses the last entry of ours on a subject (a destroy is one
            # itself, after the puts it erases): an answer below it, or none, is a lie.
            lies = {s for s in subjects if heard.seqs.get(s, 0) < folded(s)}
            if late or heard.extra or lies:
                self._forged.note(
                    f"{heard.extra} extra answer(s) and {len(lies)} below the view to one "
                    f"read of {len(subjects)} subjects' last entries (head {head})"
                )
                if not gathering:
                    continue  # read again, gathering rivals
            if heard.refused:
                return head  # not vouched for
            self.narrowed += 1
            return min(head, max((heard.seqs.get(s, 0) for s in subjects), default=0))
        return head
