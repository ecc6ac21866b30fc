"""What a rotation tells its caller: the report, its counts and the refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from events.anchor import anchor_said
from secrets_nats_kv.errors import SecretsBackendError

Outcome = Literal["rotated", "resumed", "already rotated", "dry run"]


class RotationRefused(SecretsBackendError):
    """`rotate-key` will not run as asked; the message says why and what to do."""


@dataclass
class Counts:
    """Running counts of one pass over a log (the report's numbers)."""

    entries: int = 0
    events: int = 0
    resealed: int = 0
    erased: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class RotationReport:
    """What a rotation did (or, for a dry run, would do); no key material, no values."""

    outcome: Outcome
    new_key: str
    entries: int = 0  # log positions written, gaps and the final KeyRotated included
    events: int = 0  # valid events replayed
    resealed: int = 0  # SecretPut values opened with the old key and sealed with the new
    erased: int = 0  # gaps (destroyed entries) kept at their positions
    rejected: int = 0  # entries not tagged for the old key, kept as rejected placeholders
    seconds: float = 0.0
    note: str = ""
    fenced_seconds: float | None = None  # online: from the write fence to the swapped log
    anchor_signer: str | None = None  # the anchor this run wrote: signed by, "" unsigned

    @property
    def values_per_second(self) -> float:
        return self.resealed / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(
        cls,
        outcome: Outcome,
        new_key: str,
        counts: Counts,
        seconds: float,
        note: str,
        *,
        fenced_seconds: float | None = None,
        anchor_signer: str | None = None,
    ) -> RotationReport:
        return cls(
            outcome=outcome,
            new_key=new_key,
            entries=counts.entries,
            events=counts.events,
            resealed=counts.resealed,
            erased=counts.erased,
            rejected=counts.rejected,
            seconds=seconds,
            note=note,
            fenced_seconds=fenced_seconds,
            anchor_signer=anchor_signer,
        )

    def summary(self) -> str:
        """One line for the CLI."""
        counts = (
            f"{self.events} events, {self.resealed} values re-sealed, "
            f"{self.erased} erased entries kept as gaps"
        )
        if self.rejected:
            counts += f", {self.rejected} rejected entries kept"
        verb = "rotated" if self.outcome == "rotated" else "finished the rotation of"
        if self.outcome == "already rotated":
            line = f"the event log is already rotated to {self.new_key}: nothing to do"
        elif self.outcome == "dry run":
            line = f"dry run, nothing changed: would write {counts} under {self.new_key}"
        elif self.fenced_seconds is not None:
            line = (
                f"{verb} the encryption key to {self.new_key} online: {self.resealed} values "
                f"re-sealed, {self.entries} entries, {self.values_per_second:.0f} values/s, "
                f"writes fenced for {self.fenced_seconds:.2f}s, {self.seconds:.2f}s in all"
            )
        else:
            line = f"{verb} the encryption key to {self.new_key}: {counts} in {self.seconds:.2f}s"
        line += anchor_said(self.anchor_signer)
        return f"{line} ({self.note})" if self.note else line
