"""Permission violations the server reports, and requests that fail on them at once.

A NATS server that refuses a publish or a subscription under the user's permissions does
not fail the request: it sends `-ERR 'Permissions Violation for Publish to "<subject>"'`
to the connection, which nats-py hands to the error callback (lower-cased), while the
request itself waits for a reply that never comes and times out. An operator then reads
"timed out" and looks for a dead backend. `connect` records each violation here, per
connection, and `request` fails with `PermissionRefused` naming the subject as soon as
the server has refused the request's subject or its reply inbox. Calls that go through
nats-py alone (its consumers, its KV and stream helpers) still time out; in a CLI process
(`connect(persistent=False)`) a timeout after a refusal is reported as that refusal
(`to_backend_error`), with the subject as nats-py gives it: lower-cased.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from secrets_nats_kv.errors import NatsUnavailable

PERMISSION_HINT = "check this user's permissions: secrets-nats-kv nats-permissions"
PUBLISH, SUBSCRIBE = "publish to", "subscribe to"
# nats-py's text for the server's -ERR (it lower-cases the whole line).
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')


class PermissionRefused(NatsUnavailable):
    """The server refused this user a publish or subscription the command needs."""

    def __init__(self, action: str, subject: str) -> None:
        super().__init__(
            f"NATS refused: permission denied to {action} {subject} ({PERMISSION_HINT})"
        )
        self.action = action
        self.subject = subject


@dataclass(frozen=True, slots=True)
class Violation:
    action: str  # PUBLISH or SUBSCRIBE
    subject: str  # as the server named it, lower-cased by nats-py


_IN_THIS_PROCESS: list[Violation] = []  # refusals on this process's short-lived clients


def refused_in_this_process() -> PermissionRefused | None:
    """The first refusal a short-lived (CLI) connection of this process was told of."""
    if not _IN_THIS_PROCESS:
        return None
    first = _IN_THIS_PROCESS[0]
    return PermissionRefused(first.action, first.subject)


class Refusals:
    """The permission violations reported on one connection, and a wake-up for waiters."""

    def __init__(self) -> None:
        self.seen: list[Violation] = []
        self._changed = anyio.Event()

    def note(self, exc: BaseException, *, short_lived: bool = False) -> bool:
        """Record `exc` if it is a permission violation (True then); `short_lived`: the
        connection is a CLI command's, whose timeouts the refusal explains."""
        found = _VIOLATION.search(str(exc))
        if found is None:
            return False
        action = PUBLISH if found.group(1) == "publish" else SUBSCRIBE
        self.seen.append(Violation(action, found.group(2)))
        if short_lived:
            _IN_THIS_PROCESS.append(self.seen[-1])
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        return True

    async def changed(self) -> None:
        await self._changed.wait()

    def refusal(self, subject: str, inbox_prefix: str) -> PermissionRefused | None:
        """The refusal that dooms a request to `subject` with replies under `inbox_prefix`."""
        lowered, inboxes = subject.lower(), inbox_prefix.lower() + "."
        for violation in self.seen:
            if violation.action == PUBLISH and violation.subject == lowered:
                return PermissionRefused(PUBLISH, subject)
            if violation.action == SUBSCRIBE and violation.subject.startswith(inboxes):
                return PermissionRefused(SUBSCRIBE, f"{inbox_prefix}.>")
        return None


_ATTRIBUTE = "_secrets_nats_kv_refusals"


def refusals(nc: NATS) -> Refusals:
    """The record of `nc` (`connect` feeds it from the error callback), kept on the
    connection object itself so that it lives and dies with it."""
    found = getattr(nc, _ATTRIBUTE, None)
    if not isinstance(found, Refusals):
        found = Refusals()
        setattr(nc, _ATTRIBUTE, found)
    return found


async def request(
    nc: NATS,
    subject: str,
    payload: bytes,
    *,
    reply_within: float,
    headers: dict[str, str] | None = None,
) -> Msg:
    """`nc.request`, failing with `PermissionRefused` once the server refuses it.

    nats-py's own errors (a timeout, no responders) pass through unchanged. A stand-in
    for the client (the unit tests' in-process bus) has no server to refuse anything.
    """
    if not isinstance(nc, NATS):
        return await nc.request(subject, payload, timeout=reply_within, headers=headers)
    record = refusals(nc)
    inbox_prefix = nc.new_inbox().rsplit(".", 1)[0]
    replies: list[Msg] = []
    failures: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def ask() -> None:
            try:
                replies.append(
                    await nc.request(subject, payload, timeout=reply_within, headers=headers)
                )
            except Exception as exc:  # re-raised below, outside the task group
                failures.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while record.refusal(subject, inbox_prefix) is None:
                await record.changed()
            tg.cancel_scope.cancel()

        tg.start_soon(ask)
        tg.start_soon(watch)
    refused = record.refusal(subject, inbox_prefix)
    if refused is not None:
        raise refused
    if failures:
        raise failures[0]
    return replies[0]
