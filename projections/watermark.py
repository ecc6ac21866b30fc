"""How far a consumer of the log has applied it, and a way to wait for a position.

The live view (folded up to), the KV writer (written up to) and the shredder (erased up
to) each own one; a command waits on them before it answers, so its reply is honest.
One implementation instead of a hand-made broadcast in each: waiters are woken only
when the position moves and only if someone waits (no event churn on the hot path).
"""

from __future__ import annotations

import anyio


class Watermark:
    """A log position that only moves forward; `wait_for(seq)` returns once it reached `seq`."""

    __slots__ = ("_at", "_failed", "_moved", "_waiting")

    def __init__(self, at: int = 0) -> None:
        self._at = at
        self._moved = anyio.Event()
        self._waiting = 0
        self._failed: Exception | None = None

    @property
    def at(self) -> int:
        return self._at

    def advance(self, seq: int) -> None:
        """Everything up to `seq` is applied (an older position changes nothing)."""
        if seq <= self._at:
            return
        self._at = seq
        if self._waiting:
            self._moved.set()
            self._moved = anyio.Event()

    def fail(self, error: Exception) -> None:
        """The position will not move again (the live view stopped at a broken chain):
        every waiter behind it, now and later, raises `error`."""
        self._failed = error
        self._moved.set()
        self._moved = anyio.Event()

    async def wait_for(self, seq: int) -> None:
        """Return once the position is at or past `seq`; callers bound the wait."""
        self._waiting += 1
        try:
            while self._at < seq:
                if self._failed is not None:
                    raise self._failed
                await self._moved.wait()
        finally:
            self._waiting -= 1
