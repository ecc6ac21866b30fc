"""`run --workers N`: N backend processes on one machine, sharing the queue group.

Python runs one core per process, so a machine with several cores serves more gets with
several backends. The first process is this one; it starts N-1 children with the same
arguments (and `--workers 1`), restarts a child that dies, and on SIGINT/SIGTERM passes
the signal on and waits for them to drain. If the supervisor itself is cancelled (its own
backend failed), it stops its children too rather than leaving them serving unsupervised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import Process

log = logging.getLogger(__name__)

_HEALTHY_RUN_S = 60.0  # a child that ran this long before dying restarts without backoff


# Options left off a child's command line: `--workers` (forced to 1) and seed flags, which
# `cli` has moved into the environment the children inherit (off the process list).
_DROPPED = ("--workers", "-e", "--encryption-xkey-seed", "-t", "--transit-xkey-seed")


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line of a child: ours with `--workers` forced to 1 and no seed flags."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _DROPPED:
            skip = True
            continue
        if any(arg.startswith(f"{flag}=") for flag in _DROPPED if flag.startswith("--")):
            continue
        if arg[:2] in ("-e", "-t") and len(arg) > 2:  # -eSEED
            continue
        out.append(arg)
    return [sys.executable, "-m", "secrets_nats_kv.app.cli", *out, "--workers", "1"]


SUPERVISOR_ENV = "SECRETS_NATS_KV_SUPERVISOR_PID"


async def stop_when_orphaned(stopping: anyio.Event, stop: Callable[[], None]) -> None:
    """In a worker: stop once the supervising `run` is gone, even if it was SIGKILLed.

    A worker outliving its supervisor would keep serving with nobody to stop or restart
    it; its parent pid changing is the only sign of that, so it is checked periodically.
    """
    parent = os.environ.get(SUPERVISOR_ENV)
    if parent is None or not parent.isdigit():
        return
    while not stopping.is_set():
        if os.getppid() != int(parent):
            log.warning("supervising process is gone: stopping this worker")
            stop()
            return
        with anyio.move_on_after(1.0):
            await stopping.wait()


async def supervise_children(argv: Sequence[str], count: int, stopping: anyio.Event) -> None:
    """Keep `count` child backends running until `stopping`, then stop them in order."""
    if count <= 0:
        return
    command = child_argv(argv)
    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(_keep_running, command, index, stopping)


async def _keep_running(command: list[str], index: int, stopping: anyio.Event) -> None:
    delay = 0.5
    while not stopping.is_set():
        started = anyio.current_time()
        process = await anyio.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env={**os.environ, SUPERVISOR_ENV: str(os.getpid())},
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on, stopping, process)
                code = await process.wait()
                tg.cancel_scope.cancel()
        finally:
            # Cancelled (the parent's own backend failed): never leave a child serving alone.
            if process.returncode is None:
                with anyio.CancelScope(shield=True):
                    await _terminate(process)
        if stopping.is_set():
            return
        log.warning("worker exited, restarting", extra={"worker": index, "code": code})
        if anyio.current_time() - started > _HEALTHY_RUN_S:
            delay = 0.5  # a crash after a long healthy run is not a crash loop
        with anyio.move_on_after(delay):
            await stopping.wait()  # back off before restarting, unless we are stopping
        delay = min(delay * 2, 10.0)


async def _stop_on(stopping: anyio.Event, process: Process) -> None:
    await stopping.wait()
    with anyio.CancelScope(shield=True):
        await _terminate(process)


async def _terminate(process: Process) -> None:
    """SIGTERM (the child drains), SIGKILL if it is not gone within 10 s."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(10) as scope:
        await process.wait()
    if scope.cancelled_caught:
        process.kill()
        await process.wait()
