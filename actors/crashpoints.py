"""Named points inside a long offline run (`rotate-key`, `import`) where a test may stop it.

Crash safety is proven by killing a run at exact points and running it again. The
product only names the points and asks whether to stop; what stopping means (the tests
exit hard with `os._exit`, like SIGKILL) is injected by the caller
(tests/support/crash.py); the product never reads it from the environment.

`rotate-key`: `stage` and `live` count messages published (flushed to the server before
stopping), `staged` once staging is complete but not committed, `commit` right after the
commit, `rebuild` counts entries of the KV rebuild, `cleanup` is just before the staging
stream is deleted. `rotate-key --online` adds `catchup` (messages published by the copy
passes after the first), `fenced` (the write fence just appended to the live log, not yet
copied) and `filled` (the live log refilled but for its marker; online, `rebuild`
comes after the marker).
`import`: `append` counts entries sent (flushed first), `appended`
once every entry is acknowledged, `dropped` once the original's streams are deleted,
`refold` counts log entries folded into the new buckets.
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
