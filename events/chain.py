"""Reading the chained log: what may be folded, in order, and where the chain breaks.

`ChainReader` is fed the log's positions in order (stored entries and gaps) and releases
only entries it has verified. It does no I/O, so the live view, `rebuild`, `audit`,
`verify` and `rotate-key` all judge a log the same way. The rules:

- An entry whose *entry tag* does not verify is not ours (forged, or a genuine entry
  replayed at another position): it is released as `Rejected` and the chain skips it.
- An entry that is ours must *link* to the previous accepted entry; if it does not, the
  log was changed under it (replaced, reordered, spliced from another log): a break.
- A gap (a missing position) is accepted only where a tagged `SecretDestroyed` names it
  (its recorded digest carries the chain across), or a tagged `LogRepaired` (an
  operator's `repair`) does. Those events come after the gap, so entries after a gap are
  held, not released, until the event naming it is itself verified.
- A gap a tagged `ForeignDropped` names (before its own position) held an entry not ours
  that `repair` removed: the link is carried across it unchanged, as a foreign entry never
  was part of the chain, and it is not released at all (no erased revision: the fold
  never sees it). The claim checks itself: had the position held an entry of ours, the
  next entry of ours links to that entry, not across it, and the chain breaks there.
- At the head (the end of what the log holds now), anything still held is a break: a
  deleted entry, or a deleted tail.

A break raises `ChainBroken` naming the position; nothing at or after it is released.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from events.codec import EventCodec
from events.types import (
    Event,
    ForeignDropped,
    LogRepaired,
    Rejected,
    SecretDestroyed,
    UndecodableEvent,
)
from secrets_nats_kv.barrier import CHAIN_HEADER, GENESIS, PREV_HEADER, digest
from secrets_nats_kv.errors import StorageError


@dataclass(frozen=True, slots=True)
class Raw:
    """One position as the stream holds it: `body` None where the position is a gap."""

    seq: int
    time: float
    body: bytes | None
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Verified:
    """A position the fold may apply: the event (None: erased), its body's digest, the link."""

    seq: int
    time: float
    event: Event | Rejected | None
    digest: str
    link: str


class ChainBroken(StorageError):
    """The log does not verify at `seq`: nothing from there on is served or folded."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__("event log integrity", f"chain broken at entry #{seq}: {reason}")
        self.seq = seq
        self.reason = reason


class WrongKey(StorageError):
    """No entry of a non-empty log is tagged by this key."""

    def __init__(self) -> None:
        super().__init__(
            "event log integrity",
            "no entry of the event log is tagged by this ENCRYPTION_XKEY_SEED "
            "(a wrong key, or a foreign log)",
        )


@dataclass
class _Claims:
    """What the naming events held among the pending entries say (checked as they verify)."""

    digests: dict[int, str] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    relinked: set[int] = field(default_factory=set)
    foreign: set[int] = field(default_factory=set)  # `ForeignDropped`: held none of ours

    @property
    def explained(self) -> set[int]:
        """Positions some naming event accounts for (whether or not it verifies)."""
        return {*self.digests, *self.lost, *self.relinked, *self.foreign}

    def dropped(self, seq: int) -> bool:
        """Gap `seq` is only a foreign entry removed (no other event names it)."""
        return seq in self.foreign and seq not in self.digests and seq not in self.lost


@dataclass
class _Walk:
    """The outcome of walking the held entries once."""

    released: list[Verified]  # including dropped foreign positions (not handed on)
    unnamed: int | None  # first gap or relink not yet named by a verified event
    mismatch: int | None  # position of an entry of ours that links to nothing known


class ChainReader:
    """Feed positions in order with `push`; call `at_head` when the log's end is reached."""

    def __init__(
        self,
        codec: EventCodec,
        *,
        after: int = 0,
        link: str = GENESIS,
        assume: LogRepaired | None = None,
    ) -> None:
        """Read on from position `after`, whose link is `link`. `assume` is a repair not yet
        written, taken as verified (how `repair` computes the link its event follows)."""
        self._codec = codec
        self.seq = after  # last position released
        self.link = link  # the link the next entry of ours must follow
        self._held: list[Raw] = []
        self.ours = 0  # entries of ours released
        self.foreign = 0  # entries not tagged by our key released
        self.dropped = 0  # gaps where `repair` removed an entry not ours (not released)
        self._from_start = after == 0
        self._assumed = set() if assume is None else {*assume.lost, *assume.relinked}
        self._assume = assume

    def push(self, raw: Raw) -> list[Verified]:
        """Verify `raw` (or hold it behind a gap); the entries that may be folded now."""
        if raw.seq <= self.seq or (self._held and raw.seq <= self._held[-1].seq):
            return []  # a redelivery
        if not self._held and raw.body is not None:
            verified = self._one(raw)
            if verified is not None:
                self._release([verified])
                return [verified]
        self._held.append(raw)
        if raw.body is not None and self._names_something(raw):
            return self._resolve(final=False)
        return []

    def at_head(self) -> list[Verified]:
        """Everything held must verify now; otherwise the chain is broken (raises)."""
        try:
            released = self._resolve(final=True) if self._held else []
        except ChainBroken:
            if self._wrong_key():
                raise WrongKey() from None
            raise
        if self._wrong_key():
            raise WrongKey()
        return released

    def _wrong_key(self) -> bool:
        """Read from the start and not one stored entry is ours."""
        held_ours = any(
            raw.body is not None and self._codec.authentic(raw.seq, raw.body, raw.headers)
            for raw in self._held
        )
        stored = self.foreign > 0 or any(raw.body is not None for raw in self._held)
        return self._from_start and self.ours == 0 and not held_ours and stored

    # --- one entry, no gap pending ------------------------------------------------------

    def _one(self, raw: Raw) -> Verified | None:
        """The common case: an entry right after an accepted one. None: hold it (a break?)."""
        assert raw.body is not None
        if not self._codec.authentic(raw.seq, raw.body, raw.headers):
            return Verified(raw.seq, raw.time, Rejected(reason="not tagged by our key"), "", "")
        body_digest = digest(raw.body)
        expected = self._codec.barrier.link(raw.seq, body_digest, self.link)
        if not self._codec.barrier.links((raw.headers or {}).get(CHAIN_HEADER), expected):
            return None  # ours, but not following: only a later repair can accept it
        return Verified(raw.seq, raw.time, _decode(self._codec, raw.body), body_digest, expected)

    def _release(self, entries: list[Verified]) -> None:
        for entry in entries:
            self.seq = entry.seq
            if entry.link:
                self.link = entry.link
                self.ours += 1
            elif isinstance(entry.event, Rejected):
                self.foreign += 1

    # --- entries held behind a gap or a break ---------------------------------------------

    def _names_something(self, raw: Raw) -> bool:
        assert raw.body is not None
        if not self._codec.authentic(raw.seq, raw.body, raw.headers):
            return False
        try:
            event = self._codec.decode(raw.body)
        except UndecodableEvent:
            return False
        return isinstance(event, SecretDestroyed | LogRepaired | ForeignDropped)

    def _claims(self) -> _Claims:
        claims = _Claims()
        if self._assume is not None:
            claims.lost.update(self._assume.lost)
            claims.relinked.update(self._assume.relinked)
        for raw in self._held:
            if raw.body is None or not self._codec.authentic(raw.seq, raw.body, raw.headers):
                continue
            try:
                event = self._codec.decode(raw.body)
            except UndecodableEvent:
                continue
            if isinstance(event, SecretDestroyed):
                claims.digests.update(zip(event.erased_seqs, event.erased_digests, strict=False))
            elif isinstance(event, LogRepaired):
                claims.lost.update(event.lost)
                claims.relinked.update(event.relinked)
            elif isinstance(event, ForeignDropped):
                claims.foreign.update(_named_before(event, raw.seq))
        return claims

    def _resolve(self, *, final: bool) -> list[Verified]:
        claims = self._claims()
        walk = self._walk(claims)
        released = walk.released
        if released:
            self._release(released)
            self._held = self._held[len(released) :]
            kept = [v for v in released if v.event is not None or not claims.dropped(v.seq)]
            self.dropped += len(released) - len(kept)
            released = kept
        if final and self._held:
            first = self._held[0].seq
            if walk.mismatch is not None:
                raise ChainBroken(
                    walk.mismatch,
                    "the entry does not follow the entries before it "
                    "(entries replaced, reordered or from another log)",
                )
            gap = walk.unnamed if walk.unnamed is not None else first
            raise ChainBroken(
                gap, "the entry is missing (deleted?) and no tagged destroy or repair names it"
            )
        return released

    def _walk(self, claims: _Claims) -> _Walk:
        """Verify the held entries as far as the claims allow; release up to the last point
        where every gap and relink before it is named by a verified event."""
        barrier = self._codec.barrier
        candidates: list[tuple[str, str]] = [("", self.link)]  # (form of the gap run, link)
        pending: list[Verified] = []
        released: list[Verified] = []
        unnamed: dict[int, None] = {}
        mismatch: int | None = None
        for raw in self._held:
            if raw.body is None:
                candidates = _across_gap(self._codec, raw.seq, candidates, claims)
                if raw.seq not in self._assumed:
                    unnamed[raw.seq] = None
                pending.append(
                    Verified(raw.seq, raw.time, None, claims.digests.get(raw.seq, ""), "")
                )
                continue
            if not self._codec.authentic(raw.seq, raw.body, raw.headers):
                pending.append(
                    Verified(raw.seq, raw.time, Rejected(reason="not tagged by our key"), "", "")
                )
                if not unnamed:
                    released += pending
                    pending = []
                continue
            headers = raw.headers or {}
            body_digest = digest(raw.body)
            given = headers.get(CHAIN_HEADER)
            accepted = next(
                (
                    value
                    for _, previous in candidates
                    if barrier.links(given, value := barrier.link(raw.seq, body_digest, previous))
                ),
                None,
            )
            if accepted is None and raw.seq in claims.relinked:
                own = barrier.link(raw.seq, body_digest, headers.get(PREV_HEADER, ""))
                if barrier.links(given, own):
                    accepted = own
                    if raw.seq not in self._assumed:
                        unnamed[raw.seq] = None
            if accepted is None:
                # A break here unless a gap before it is one no naming event claims yet.
                explained = claims.explained
                unclaimed = [seq for seq in unnamed if seq not in explained]
                mismatch = None if unclaimed else raw.seq
                return _Walk(released, next(iter(unclaimed or unnamed), None), mismatch)
            event = _decode(self._codec, raw.body)
            candidates = [("", accepted)]
            pending.append(Verified(raw.seq, raw.time, event, body_digest, accepted))
            if isinstance(event, SecretDestroyed):
                for seq in event.erased_seqs:
                    unnamed.pop(seq, None)
            elif isinstance(event, LogRepaired):
                for seq in (*event.lost, *event.relinked):
                    unnamed.pop(seq, None)
            elif isinstance(event, ForeignDropped):
                for seq in _named_before(event, raw.seq):
                    unnamed.pop(seq, None)
            if not unnamed:
                released += pending
                pending = []
        explained = claims.explained
        unclaimed = [seq for seq in unnamed if seq not in explained]
        return _Walk(released, next(iter(unclaimed or unnamed), None), mismatch)


def _across_gap(
    codec: EventCodec, seq: int, candidates: list[tuple[str, str]], claims: _Claims
) -> list[tuple[str, str]]:
    """The links the chain may have after gap `seq`, one per way a writer could have made it:
    the erased entry's recorded digest (a live log), the erased form (a rewritten log), or
    skipped (an operator's repair). A run of gaps keeps to the form it started with.

    A removed foreign entry was never in the chain: it is skipped within a run of any form
    but the erased one (a rewritten log links it like every gap), and a run that starts
    with such skips (form "skipped") may go on in any form but the erased one, which only
    a run's first gap starts (so the candidates stay few over a long run of them)."""
    recorded = claims.digests.get(seq)
    out: list[tuple[str, str]] = []
    for form, previous in candidates:
        if form in ("", "skipped", "digest") and recorded is not None:
            out.append(("digest", codec.barrier.link(seq, recorded, previous)))
        if form in ("", "erased"):
            out.append(("erased", codec.erased_link(seq, previous)))
        if form in ("", "skipped", "lost") and seq in claims.lost:
            out.append(("lost", previous))
        elif seq in claims.foreign and form != "erased":
            out.append((form or "skipped", previous))
    return out


def _named_before(event: ForeignDropped, seq: int) -> Iterator[int]:
    """The positions `event`, stored at `seq`, names: only ones before it count."""
    for first, last in event.ranges:
        yield from range(max(first, 1), min(last, seq - 1) + 1)


def _decode(codec: EventCodec, body: bytes) -> Event | Rejected:
    try:
        return codec.decode(body)
    except UndecodableEvent:
        return Rejected(reason="tagged by our key but not an event")
