"""The real CLI, with `rotate-key` or `import` stopped hard at one crash point.

`python tests/support/crash.py <point>[:<n>] rotate-key|import ...` runs
`secrets_nats_kv.app.cli` with the run's crash points set to exit the process with
`os._exit(1)` (no cleanup, like SIGKILL) the n-th time `point` is reached (see
`actors.crashpoints` for the points). The product never reads this: the hook is handed
to `rotate_key` and `import_original` here.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path


def program(point: str) -> list[str]:
    """The command line that runs the CLI with a hook stopping at `point`."""
    return [sys.executable, str(Path(__file__).resolve()), point]


@dataclass
class ExitAt:
    """Exit at the `after`-th step of `point` (the first, if `after` is 0)."""

    point: str
    after: int = 0
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> ExitAt:
        point, _, count = text.partition(":")
        return cls(point, int(count or "0"))

    def reached(self, point: str) -> bool:
        if point != self.point:
            return False
        self.count += 1
        return self.count >= max(self.after, 1)

    def stop(self) -> None:
        os._exit(1)


def main(argv: list[str]) -> int:
    import actors.rotation
    import actors.takeover.importer as importer
    from secrets_nats_kv.app import cli

    hook = ExitAt.parse(argv[0])
    # The CLI looks these up when the command runs: hand them the hook there.
    actors.rotation.rotate_key = functools.partial(actors.rotation.rotate_key, crash=hook)  # type: ignore[assignment]
    importer.import_original = functools.partial(importer.import_original, crash=hook)  # type: ignore[assignment]
    return cli.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
