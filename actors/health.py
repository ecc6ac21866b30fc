"""What one backend instance knows about its own health, for logs, stats and `status`.

An incident is something an operator must act on or know about (a broken chain, a
bucket ahead of the log, a flood of rejected entries). Each kind is logged once when it
starts, with its count kept here rather than a line per occurrence, so a flood of bad
input costs a counter, not a log line each. The micro service publishes `snapshot()` in
its stats, where `secrets-nats-kv status` reads it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Incident:
    """One kind of trouble: when it began, how often it was seen, and the latest detail."""

    kind: str
    detail: str
    since: float
    count: int = 1
    blocks_writes: bool = False


@dataclass
class Health:
    """The incidents of one instance, keyed by kind; only new kinds are logged."""

    incidents: dict[str, Incident] = field(default_factory=dict)

    def report(self, kind: str, detail: str, *, blocks_writes: bool = False) -> bool:
        """Record an occurrence of `kind`; True (and one ERROR line) only when it is new.

        `detail` must never carry a secret value, seed or JWT: it goes to the log and to
        anyone who can read the service's stats.
        """
        known = self.incidents.get(kind)
        if known is not None:
            known.count += 1
            known.detail = detail
            known.blocks_writes = known.blocks_writes or blocks_writes
            return False
        self.incidents[kind] = Incident(kind, detail, time.time(), blocks_writes=blocks_writes)
        log.error("incident %s: %s", kind, detail)
        return True

    def resolve(self, kind: str) -> None:
        """The incident is over (an operator repaired it); logged once."""
        if self.incidents.pop(kind, None) is not None:
            log.warning("incident %s resolved", kind)

    @property
    def writes_blocked(self) -> bool:
        return any(incident.blocks_writes for incident in self.incidents.values())

    def snapshot(self) -> list[dict[str, object]]:
        """The incidents as plain data, oldest first (for the micro stats and `status`)."""
        return [
            {
                "kind": i.kind,
                "detail": i.detail,
                "since": i.since,
                "count": i.count,
                "blocks_writes": i.blocks_writes,
            }
            for i in sorted(self.incidents.values(), key=lambda i: i.since)
        ]
