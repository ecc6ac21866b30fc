"""What `import` reports: one line, counts only (never a value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from events.types import OriginalImported
from projections.import_plan import ImportPlan

Outcome = Literal["imported", "resumed", "finished", "already imported", "dry run"]


@dataclass(frozen=True)
class ImportReport:
    outcome: Outcome
    secrets: int
    versions: int
    deleted: int
    mappings: int
    bytes: int
    skipped: int
    secrets_revision: int
    state_revision: int

    def summary(self) -> str:
        what = (
            f"{self.secrets} secrets ({self.versions} versions, {self.deleted} deleted, "
            f"{self.skipped} revisions the original no longer held), {self.mappings} "
            f"mappings, {self.bytes} bytes; next version {self.secrets_revision + 1}"
        )
        return {
            "imported": f"imported {what}",
            "resumed": f"imported (resumed) {what}",
            "finished": f"finished the import of {what}",
            "already imported": f"already imported ({what}): nothing to do",
            "dry run": f"dry run: would import {what}; nothing changed",
        }[self.outcome]

    @classmethod
    def of(cls, outcome: Outcome, plan: ImportPlan) -> ImportReport:
        c = plan.counts
        return cls(
            outcome,
            c.secrets,
            c.versions,
            c.deleted,
            c.mappings,
            c.bytes,
            c.skipped,
            plan.secrets_revision,
            plan.state_revision,
        )

    @classmethod
    def of_record(cls, outcome: Outcome, record: OriginalImported) -> ImportReport:
        return cls(
            outcome,
            record.secrets,
            record.versions,
            record.deleted,
            record.mappings,
            record.bytes,
            0,
            record.secrets_revision,
            record.state_revision,
        )
