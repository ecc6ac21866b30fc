"""One `rotate-key` at a time per backend: a lock held by a subscription.

A run holds the lock by answering on `wasmcloud_secrets_rotation_lock.{name}` (a subject
no stream captures) for as long as it runs; the lock dies with the run's connection, so
a crashed run never leaves it held. To take the lock a run subscribes *first* and only
then asks who answers: if two runs overlap, the later one to subscribe always hears the
earlier one (which subscribed before it asked), so at most one of them goes on; in a
close race both may hear each other and both stop, which is safe.

The wait for other answers ends with the run's own answer (the server fans the question
out to every holder at once) plus a grace for a holder that is busy.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from secrets_nats_kv import streams
from secrets_nats_kv.errors import SecretsBackendError, StorageError
from secrets_nats_kv.nats.jetstream import to_backend_error

ANSWER_GRACE = 0.5  # seconds to wait for other holders after our own answer arrived
OWN_ANSWER_TIMEOUT = 5.0


class RotationLockHeld(SecretsBackendError):
    """Another `rotate-key` for the same backend is running."""

    def __init__(self, name: str, since: float) -> None:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        super().__init__(
            f"another rotate-key for backend {name} is running (started {started}): "
            "wait for it to finish, then run again if needed"
        )


class _Holder(msgspec.Struct, frozen=True):
    id: str
    since: float


lock_subject = streams.rotation_lock_subject  # the names: secrets_nats_kv.streams


class RotationLock:
    """`async with RotationLock(nc, name):` the body runs only while no other run holds it."""

    def __init__(self, nc: NATS, backend_name: str) -> None:
        self._nc = nc
        self._name = backend_name
        self._subject = lock_subject(backend_name)
        self._me = _Holder(id=uuid.uuid4().hex, since=time.time())
        self._answer = msgspec.json.encode(self._me)
        self._sub: Subscription | None = None

    async def __aenter__(self) -> RotationLock:
        try:
            # Subscribe, then ask: the server handles our commands in that order.
            self._sub = await self._nc.subscribe(self._subject, cb=self._on_question)
            others = await self._other_holders()
        except BaseException as exc:
            await self._release()
            if isinstance(exc, nats.errors.Error):
                raise to_backend_error("take the rotation lock", exc) from None
            raise
        if others:
            await self._release()
            raise RotationLockHeld(self._name, min(holder.since for holder in others))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._release()

    async def _release(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            # Shielded: also on cancellation (UNSUB is only queued, it does not wait).
            with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()  # an error: the connection is gone, and the lock with it

    async def _on_question(self, msg: Msg) -> None:
        if msg.reply:
            await self._nc.publish(msg.reply, self._answer)

    async def _other_holders(self) -> list[_Holder]:
        inbox = self._nc.new_inbox()
        answers = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(self._subject, b"", reply=inbox)
            others: list[_Holder] = []
            heard_myself = False
            try:
                with anyio.fail_after(OWN_ANSWER_TIMEOUT):  # back within a round trip
                    while not heard_myself:
                        heard_myself = self._note(await answers.next_msg(timeout=None), others)
            except TimeoutError:
                why = "no answer to our own question (may this user publish and subscribe there?)"
                raise StorageError(f"rotation lock {self._subject}", why) from None
            with anyio.move_on_after(ANSWER_GRACE):
                while True:
                    self._note(await answers.next_msg(timeout=None), others)
            return others
        finally:
            await answers.unsubscribe()

    def _note(self, msg: Msg, others: list[_Holder]) -> bool:
        """Record a holder's answer; True if it is our own."""
        try:
            holder = msgspec.json.decode(msg.data, type=_Holder)
        except msgspec.DecodeError:
            return False  # not a holder's answer
        if holder.id == self._me.id:
            return True
        others.append(holder)
        return False
