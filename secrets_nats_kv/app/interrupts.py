"""SIGINT and SIGTERM for every command: stop promptly, in one line, with a stated exit code.

A client command (put, get, list, backup, …) is cancelled at once, whatever it is doing
(connecting, waiting for a reply, writing a file), and exits 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM), the shell's convention for "killed by that signal".

A long-running command (`run`, `dev`) is asked to stop (`Shutdown.requested`): it stops
taking requests and answers those in flight. It exits 0 when that drain was clean; when
it was not (NATS was gone, the drain overran `GRACE_S`, or a second signal came) it exits
128 + the signal's number. The signal receiver is installed before the command starts, so
no state of the command (not even connecting to a NATS that is not there) can miss it.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

LONG_RUNNING = frozenset({"run", "dev"})
GRACE_S = 15.0  # a long-running command that has not drained by then is stopped anyway


class Interrupted(Exception):
    """The command ended because of a signal, without finishing cleanly."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Shutdown:
    """What a long-running command watches to know it must stop, and reports back."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    signum: int | None = None
    clean: bool = False  # set by the command when it drained everything it had taken
    why_unclean: str = "before requests in flight were all answered"

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "signal"


def run_interruptible(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run `command(args)` under anyio with SIGINT/SIGTERM handled as described above."""
    return anyio.run(_supervised, command, args)


async def _supervised(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    shutdown = Shutdown()
    args.shutdown = shutdown
    long_running = args.command in LONG_RUNNING
    forced = False
    result: list[int] = []

    async def watch(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal forced
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if shutdown.signum is None:
                    shutdown.signum = signum
                    shutdown.requested.set()
                    if not long_running:
                        forced = True
                        tg.cancel_scope.cancel()
                        return
                    tg.start_soon(overrun)
                else:  # a second signal: stop now, drained or not
                    forced = True
                    tg.cancel_scope.cancel()
                    return

    async def overrun() -> None:
        nonlocal forced
        await anyio.sleep(GRACE_S)
        forced = True
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        await tg.start(watch)
        result.append(await command(args))
        tg.cancel_scope.cancel()
    if shutdown.signum is not None and (forced or not shutdown.clean or not result):
        what = "stopped" if long_running else "interrupted"
        detail = f" {shutdown.why_unclean}" if long_running else ""
        if forced and long_running:
            detail = " before its drain finished"
        raise Interrupted(f"{what} by {shutdown.signal_name}{detail}", 128 + shutdown.signum)
    return result[0] if result else 1
