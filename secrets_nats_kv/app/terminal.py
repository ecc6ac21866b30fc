"""What the commands write for a person: lines on stdout, plurals, a progress bar.

Kept apart so that every command words its output the same way and a long command
(rebuild, rotate-key, import, backup) shows progress only when a person is watching.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 version`, `2 versions`: output a person reads without wincing."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def progress_printer(label: str, unit: str = "events") -> Callable[[int, int], None] | None:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent != last[0]:
            last[0] = percent
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\r{label} [{bar:<25}] {done}/{total} {unit}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show
