"""Named points inside a rotation where a test may stop the process.

The rotation's crash safety is proven by killing it at exact points and re-running. The
product only names the points and asks whether to stop; what stopping means (the tests
exit hard with `os._exit`, like SIGKILL) is injected by the caller. Points: `stage` and
`live` count messages published (flushed to the server before stopping), `staged` once
staging is complete but not committed, `commit` right after the commit, `rebuild` counts
entries of the KV rebuild, `cleanup` is just before the staging stream is deleted.
"""

from __future__ import annotations

from typing import Protocol


class CrashPoints(Protocol):
    def reached(self, point: str) -> bool:
        """Count one step at `point`; True when the run should stop right here."""
        ...

    def stop(self) -> None:
        """Stop the run now (a test's hook; it does not return)."""
        ...


class NoCrashes:
    """The product's crash points: never stop."""

    def reached(self, point: str) -> bool:
        return False

    def stop(self) -> None:
        return None


NO_CRASHES = NoCrashes()
