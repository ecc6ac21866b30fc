"""The reference model against the real admin actors and get responder, over an in-memory
event log: the NATS tier's model run (tests/nats/test_model.py) without a server.

Each drawn history goes through the real clients (`AdminClient`, `HostClient`) into the
real actors (`support.memlog.MemoryBackend`: the store and lifecycle actors, the
decider, the live view, the shredder, the get responder, behind the pool's dispatch),
sealed and signed as over the wire. Every reply must be the model's (a revision, a
value, a listing, or the exact protocol error); at the end the live view must mean what
the model holds, a fold of the log as the shredder left it must equal the live view, and
a backend started afresh on the same log (a restart) must catch up to the same view.
"""

from __future__ import annotations

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.chain import ChainBroken, WrongKey
from events.log import LogEntry
from events.types import Event, FenceLifted, WritesFenced
from projections.state import ViewState, fold
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.errors import ProtocolError
from secrets_nats_kv.xkeys import SealBox
from support.harness import Identity, Keys
from support.host import HostClient
from support.memlog import MemoryBackend, MemoryEventLog
from support.model import Model, Outcome, Projection, Refusal, concrete_version, shown
from support.parties import Party
from support.strategies import AUDITOR, HISTORIES, NAMES, JwtCase, operations

KEYS = Keys()
AT_REST = SealBox(KEYS.encryption, KEYS.encryption)
PARTIES = {name: Party(Identity()) for name in ("comp1", "comp2", AUDITOR)}
PARTIES["prov"] = Party(Identity.provider())

Operation = tuple[object, ...]


class Run:
    """One history against a fresh in-memory backend and a fresh model."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.model = Model()
        self.admin = AdminClient(backend.connection, backend.names, KEYS.transit, retries=0)
        self.host = HostClient(backend.connection, backend.names)

    async def expect(self, what: str, predict: object, act: object) -> Outcome:
        """The model's prediction (a callable) against the actors' reply (an awaitable maker)."""
        try:
            expected: Outcome = ("ok", predict())  # type: ignore[operator]
        except Refusal as refusal:
            expected = ("refused", refusal.variant)
        try:
            actual: Outcome = ("ok", await act())  # type: ignore[operator]
        except ProtocolError as exc:
            actual = ("refused", exc.variant)
        assert actual == expected, f"{what}: actors {shown(actual)}, model {shown(expected)}"
        return actual

    async def apply(self, op: Operation) -> None:
        model, admin = self.model, self.admin
        match op:
            case ("fence",) | ("lift",):
                await self.rotation_mark(op[0])
            case ("put", str(name), value):
                assert isinstance(value, str | bytes)
                await self.expect(
                    "put", lambda: model.put(name, value), lambda: admin.put_secret(name, value)
                )
            case ("map", str(entity), list(names), bool(add)):
                key = PARTIES[entity].key
                change = admin.add_mapping if add else admin.remove_mapping
                await self.expect(
                    "map", lambda: model.map(key, names, add=add), lambda: change(key, names)
                )
            case ("delete", str(name)):
                await self.expect("delete", lambda: model.delete(name), lambda: admin.delete(name))
            case ("undelete", str(name)):
                await self.expect(
                    "undelete", lambda: model.undelete(name), lambda: admin.undelete(name)
                )
            case ("destroy", str(name), choice):
                version = int(concrete_version(model, choice, name) or 0)  # type: ignore[arg-type]
                await self.expect(
                    f"destroy version {version}",
                    lambda: model.destroy(name, version, False),
                    lambda: admin.destroy(name, version=version),
                )
            case ("destroy_all", str(name)):
                await self.expect(
                    "destroy all",
                    lambda: model.destroy(name, None, True),
                    lambda: admin.destroy(name, all=True),
                )
            case ("get", str(who), str(name), str(jwt), choice):
                await self.get(who, name, jwt, concrete_version(model, choice, name))  # type: ignore[arg-type]
            case ("list",):

                async def listing() -> list[tuple[str, int, int, bool]]:
                    rows = await admin.list_secrets()
                    return [(s.name, s.version, s.versions, s.deleted) for s in rows]

                await self.expect("list", model.listing, listing)
            case _:
                raise AssertionError(f"unknown operation {op}")

    async def rotation_mark(self, what: str) -> None:
        """What `rotate-key --online` appends to the live log: a fence, or its lifting."""
        log, view = self.backend.log, self.backend.view
        event: Event = (
            WritesFenced(new_key=KEYS.encryption.public_key, rotation="r1", at=1.0)
            if what == "fence"
            else FenceLifted(rotation="r1", at=1.0)
        )
        appended = await log.append(event, expected_last_seq=await log.head(), previous=view.link)
        await view.wait_applied(appended.seq)
        if what == "fence":
            self.model.fence()
        else:
            self.model.lift()

    async def get(self, who: str, name: str, jwt: JwtCase, version: str | None) -> None:
        party = PARTIES[who]
        entity_jwt, host_jwt = party.tokens[jwt]

        async def read() -> tuple[int, str, str | bytes]:
            secret = await self.host.get(
                name, entity_jwt=entity_jwt, host_jwt=host_jwt, version=version
            )
            if secret.binary_secret is not None:
                return int(secret.version), "binary", bytes(secret.binary_secret)
            assert secret.string_secret is not None
            return int(secret.version), "string", secret.string_secret

        await self.expect(
            f"get {name!r} version {version!r} as {who} ({jwt})",
            lambda: self.model.get(party.key, jwt, name, version),
            read,
        )

    def check_views(self, log: MemoryEventLog) -> None:
        live = self.backend.view.state
        diff = Projection.of(live, AT_REST).differences(self.model.projection())
        assert not diff, "live view != model:\n" + "\n".join(diff)
        refolded = ViewState()
        for seq in range(1, len(log.stored) + 1):
            entry = LogEntry(seq, 0.0, log.read(seq))
            fold(refolded, entry.seq, entry.event)
        diff = Projection.of(refolded, AT_REST, as_kept=True).differences(
            Projection.of(live, AT_REST, as_kept=True)
        )
        assert not diff, "fold of the erased log != live view:\n" + "\n".join(diff)


async def run_history(history: list[Operation]) -> MemoryEventLog:
    log = MemoryEventLog()
    async with MemoryBackend(log, KEYS.transit, KEYS.encryption) as backend:
        run = Run(backend)
        auditor = PARTIES[AUDITOR].key
        await run.expect(
            "map the auditor",
            lambda: run.model.map(auditor, list(NAMES), add=True),
            lambda: run.admin.add_mapping(auditor, NAMES),
        )
        for op in history:
            await run.apply(op)
        run.check_views(log)
    # A backend started afresh on the same log (a restart) catches up to the same view.
    async with MemoryBackend(log, KEYS.transit, KEYS.encryption) as restarted:
        await restarted.view.wait_applied(await log.head())
        diff = Projection.of(restarted.view.state, AT_REST).differences(run.model.projection())
        assert not diff, "restarted view != model:\n" + "\n".join(diff)
    return log


def _or_rotation_mark(pair: tuple[Operation, int]) -> Operation:
    """One step in eight is an online rotation fencing writes or lifting the fence."""
    op, roll = pair
    return {14: ("fence",), 15: ("lift",)}.get(roll, op)


FENCED_HISTORIES = st.lists(
    st.tuples(operations(NAMES[:2]), st.integers(0, 15)).map(_or_rotation_mark), max_size=30
)


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(FENCED_HISTORIES)
def test_the_actors_answer_what_the_model_says(history: list[Operation]) -> None:
    anyio.run(run_history, history)


# --- tampering, as anyone on the bus could ------------------------------------------------------


def tampered(log: MemoryEventLog, how: str, data: st.DataObject) -> MemoryEventLog:
    """A copy of `log` with one thing done to it that needs no key."""
    copy = MemoryEventLog()
    copy.codec = log.codec
    copy.stored = list(log.stored)
    present = [i for i, entry in enumerate(copy.stored) if entry is not None]
    i = data.draw(st.sampled_from(present), label="entry")
    if how == "delete":
        copy.stored[i] = None
    elif how == "swap":
        j = data.draw(st.sampled_from(present), label="other")
        copy.stored[i], copy.stored[j] = copy.stored[j], copy.stored[i]
    elif how == "truncate":
        del copy.stored[i:]
    else:  # a forgery appended: an event's bytes with headers made up
        stored = copy.stored[i]
        assert stored is not None
        copy.stored.append((stored[0], {**stored[1], "Secrets-Event-Tag": "0" * 64}))
    return copy


async def served_or_refused(log: MemoryEventLog) -> ViewState | None:
    """The view a backend started on `log` serves, or None if it refused to start."""
    refused = False
    try:
        async with MemoryBackend(log, KEYS.transit, KEYS.encryption) as backend:
            await backend.view.wait_applied(await log.head())
            return backend.view.state
    except* (ChainBroken, WrongKey):
        refused = True
    assert refused
    return None


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(HISTORIES, st.sampled_from(["delete", "swap", "truncate", "forge"]), st.data())
def test_a_tampered_log_is_refused_or_serves_a_genuine_prefix(
    history: list[Operation], how: str, data: st.DataObject
) -> None:
    """Deleting any entry is always refused; otherwise what a restarted backend serves is
    the fold of an untouched prefix of the log (a cut tail is the anchor's to catch)."""
    log = anyio.run(run_history, history)
    changed = tampered(log, how, data)
    state = anyio.run(served_or_refused, changed)
    if how == "delete":
        assert state is None, "a log missing an entry was served"
        return
    if state is None:
        return
    # The untouched prefix: up to the first position the tampering changed.
    same = 0
    while same < min(len(log.stored), len(changed.stored)) and (
        log.stored[same] == changed.stored[same]
    ):
        same += 1
    prefix = ViewState()
    for seq in range(1, same + 1):
        fold(prefix, seq, log.read(seq))
    assert Projection.of(state, AT_REST).differences(Projection.of(prefix, AT_REST)) == []
