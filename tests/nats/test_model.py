"""The live backend against a plain in-memory model, driven by a hypothesis state machine.

Two `Backend` instances share one queue group on one real nats-server, so every request
lands on either of them; a third party (the model, a few dicts) predicts every reply:
the revision of a write, the value of a get, or the exact protocol error. After every
step the machine checks what must hold whatever the history: both live views equal a
fold of the log from sequence 0 and the model, acknowledged writes read back at their
revision, no entity reads outside its mapping, revisions only grow. Rules also restart
an instance (it must catch up) and rebuild the KV views from the log (they must come
back equal). Async work runs on one event loop in a thread (an anyio blocking portal),
since hypothesis drives the rules synchronously.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec
import nats.js.errors
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from nats.aio.client import Client as NATS

from actors.backend import Backend
from events.log import EventLog
from projections.kv import KvLayout
from projections.rebuild import rebuild_views
from projections.state import ViewState, fold
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import KIND_HEADER, BackendConfig, BackendNames, NatsOptions
from secrets_nats_kv.errors import ProtocolError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import SealBox
from support.harness import Identity, Keys, backend_config
from support.host import HostClient
from support.leakcheck import remember
from support.model import (
    Kind,
    KvDeleted,
    KvValue,
    Model,
    Outcome,
    Projection,
    Value,
    concrete_version,
    outcome,
    shown,
)
from support.parties import Party
from support.strategies import (
    AUDITOR,
    ENTITIES,
    JWT_CASES,
    NAMES,
    REVISION_CHOICES,
    VERSION_CHOICES,
    JwtCase,
    VersionChoice,
)

LONG = os.environ.get("SECRETS_NATS_KV_LONG_TESTS") == "1"
# 20 histories of 60 steps on two real backends per CI run (80 with the long tests): the
# same model runs thousands of histories against the fold and the actors over the
# in-memory log in the unit tier; here it checks the real backend agrees with it.
MAX_EXAMPLES = 80 if LONG else 20
STEPS = 100 if LONG else 60
INSTANCES = 2
OP_TIMEOUT = 30.0  # one rule's network work; far above what a healthy step needs
MAX_HISTORY = 64  # the secrets bucket's per-key history (BackendConfig's default)


T = TypeVar("T")

_namespaces = itertools.count()


# --- the system under test ------------------------------------------------------------------


@dataclass
class Instance:
    backend: Backend
    done: Future[None]


@dataclass
class Counters:
    """What the runs did, for the report and a floor on honesty (the rules did run)."""

    examples: int = 0
    steps: int = 0
    gets_ok: int = 0
    restarts: int = 0
    rebuilds: int = 0
    kv_checks: int = 0


async def _within(coro: Awaitable[T]) -> T:
    with anyio.fail_after(OP_TIMEOUT):
        return await coro


class BackendMachine(RuleBasedStateMachine):
    """One example: a fresh namespace (backend name, buckets) on the shared server."""

    def __init__(self, portal: BlockingPortal, url: str, counters: Counters) -> None:
        super().__init__()
        self.portal = portal
        self.counters = counters
        counters.examples += 1
        n = next(_namespaces)
        self.keys = Keys()
        remember(self.keys.transit.seed)
        remember(self.keys.encryption.seed)
        self.config: BackendConfig = backend_config(
            url, self.keys, names=BackendNames(name=f"model{n}", secrets_bucket=f"MODEL_{n}")
        )
        self.names = self.config.names
        self.at_rest = SealBox(self.keys.encryption, self.keys.encryption)
        self.model = Model()
        self.parties = {name: Party(Identity()) for name in ("comp1", "comp2", AUDITOR)}
        self.parties["prov"] = Party(Identity.provider())
        self.acked: list[tuple[str, int]] = []  # every acknowledged put: (name, revision)
        self.last_revision: dict[str, int] = {}
        self.probe = 0  # rotates the sample checks deterministically
        self.instances: list[Instance] = []
        self.nc: NATS | None = None
        try:
            for _ in range(INSTANCES):
                self.instances.append(self._start_instance())
            self.nc = self.call(
                lambda: connect(NatsOptions(servers=(url,)), name="model client", persistent=False)
            )
            self.admin = AdminClient(self.nc, self.names, self.keys.transit)
            self.host = HostClient(self.nc, self.names)
            self._admin_ok(
                "map the auditor",
                lambda: self.model.map(self.parties[AUDITOR].key, list(NAMES), add=True),
                lambda: self.admin.add_mapping(self.parties[AUDITOR].key, NAMES),
            )
        except BaseException:
            self.teardown()
            raise

    # --- plumbing -----------------------------------------------------------------------

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            return await _within(fn(*args))

        return self.portal.call(bounded)

    def _start_instance(self) -> Instance:
        backend = Backend(self.config)
        done, _ = self.portal.start_task(backend.run)
        return Instance(backend, done)

    def _stop_instance(self, instance: Instance) -> None:
        self.portal.call(instance.backend.stop)
        instance.done.result(timeout=OP_TIMEOUT)  # raises what the backend died of, if it did

    def teardown(self) -> None:
        try:
            for instance in self.instances:
                self._stop_instance(instance)
        finally:
            if self.nc is not None:
                self.portal.call(self.nc.close)

    def _step(self) -> None:
        self.counters.steps += 1

    def _admin_ok(
        self, what: str, expect: Callable[[], object], act: Callable[[], Awaitable[object]]
    ) -> object:
        """Run an admin operation and the model's prediction; they must agree exactly."""
        expected = outcome(expect)
        actual = self._actual(act)
        assert actual == expected, f"{what}: backend {actual}, model {expected}"
        return actual[1]

    def _actual(self, act: Callable[[], Awaitable[object]]) -> Outcome:
        async def attempt() -> Outcome:
            try:
                return ("ok", await act())
            except ProtocolError as exc:
                return ("refused", exc.variant)

        return self.call(attempt)

    def _record_revision(self, name: str, result: object) -> None:
        """Revisions of one secret strictly increase, whatever happened in between."""
        if isinstance(result, int):
            previous = self.last_revision.get(name, 0)
            assert result > previous, f"{name}: revision {result} after {previous}"
            self.last_revision[name] = result

    async def _get(self, party: Party, jwt: JwtCase, name: str, version: str | None) -> object:
        entity_jwt, host_jwt = party.tokens[jwt]
        secret = await self.host.get(
            name, entity_jwt=entity_jwt, host_jwt=host_jwt, version=version
        )
        return _read(secret)

    def _check_get(self, who: str, jwt: JwtCase, name: str, version: str | None) -> Outcome:
        party = self.parties[who]
        expected = outcome(lambda: self.model.get(party.key, jwt, name, version))
        actual = self._actual(lambda: self._get(party, jwt, name, version))
        assert actual == expected, (
            f"get {name!r} version {version!r} as {who} ({jwt} tokens): "
            f"backend {shown(actual)}, model {shown(expected)}"
        )
        if actual[0] == "ok":
            self.counters.gets_ok += 1
        return actual

    def _version(self, choice: VersionChoice, name: str) -> str | None:
        """A drawn choice made concrete against the revisions issued so far."""
        return concrete_version(self.model, choice, name)

    # --- rules: writes ------------------------------------------------------------------

    @rule(
        name=st.sampled_from(NAMES),
        drawn=st.one_of(st.text(max_size=24), st.binary(max_size=24)),
        marker=st.one_of(st.none(), st.uuids()),
    )
    def put(self, name: str, drawn: Value, marker: uuid.UUID | None) -> None:
        """A drawn value (empty, unicode, any bytes), or one made unique for the leak check.

        Only marked values are remembered: a drawn one may well be public text as well
        (hypothesis likes the code's own string constants), and the check would cry wolf.
        """
        self._step()
        value = drawn
        if marker is not None:
            value = marker.hex + drawn if isinstance(drawn, str) else marker.bytes + drawn
            remember(value)
        result = self._admin_ok(
            f"put {name!r}",
            lambda: self.model.put(name, value),
            lambda: self.admin.put_secret(name, value),
        )
        assert isinstance(result, int)
        self.acked.append((name, result))
        self._record_revision(name, result)

    @rule(
        name=st.sampled_from(NAMES),
        values=st.lists(
            st.one_of(st.text(max_size=8), st.binary(max_size=8)), min_size=2, max_size=4
        ),
    )
    def concurrent_puts(self, name: str, values: list[Value]) -> None:
        """Puts racing through both instances: each lands once, on the next free revisions.

        One secret only: which value wins which revision is the race's to decide, and with
        one name the rest of the run (and a failure's replay) does not depend on it.
        """
        self._step()
        base = self.model.revision

        async def race() -> list[int]:
            revisions = [0] * len(values)

            async def put(i: int, value: Value) -> None:
                revisions[i] = await self.admin.put_secret(name, value)

            async with anyio.create_task_group() as tg:
                for i, value in enumerate(values):
                    tg.start_soon(put, i, value)
            return revisions

        revisions = self.call(race)
        assert sorted(revisions) == list(range(base + 1, base + len(values) + 1)), revisions
        for revision, value in sorted(zip(revisions, values, strict=True)):
            assert self.model.put(name, value) == revision
            self.acked.append((name, revision))
            self._record_revision(name, revision)

    @rule(
        entity=st.sampled_from(ENTITIES),
        names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
        add=st.booleans(),
    )
    def change_mapping(self, entity: str, names: list[str], add: bool) -> None:
        self._step()
        key = self.parties[entity].key
        self._admin_ok(
            f"{'add' if add else 'remove'} mapping {entity} {names}",
            lambda: self.model.map(key, names, add=add),
            lambda: (self.admin.add_mapping if add else self.admin.remove_mapping)(key, names),
        )

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        self._step()
        result = self._admin_ok(
            f"delete {name!r}", lambda: self.model.delete(name), lambda: self.admin.delete(name)
        )
        self._record_revision(name, result)

    @rule(name=st.sampled_from(NAMES))
    def undelete(self, name: str) -> None:
        self._step()
        result = self._admin_ok(
            f"undelete {name!r}",
            lambda: self.model.undelete(name),
            lambda: self.admin.undelete(name),
        )
        self._record_revision(name, result)

    @rule(name=st.sampled_from(NAMES), choice=REVISION_CHOICES)
    def destroy_version(self, name: str, choice: tuple[str, int]) -> None:
        """The secret's own revision (a value or a marker), another's, or one not issued."""
        self._step()
        version = int(self._version(choice, name) or 0)
        self._admin_ok(
            f"destroy {name!r} version {version}",
            lambda: self.model.destroy(name, version, False),
            lambda: self.admin.destroy(name, version=version),
        )

    @rule(name=st.sampled_from(NAMES), both=st.booleans())
    def destroy_needs_one_target(self, name: str, both: bool) -> None:
        """Neither a version nor `all`, or both: refused before the secret is looked at."""
        self._step()
        version = 1 if both else None
        self._admin_ok(
            f"destroy {name!r} version={version} all={both}",
            lambda: self.model.destroy(name, version, both),
            lambda: self.admin.destroy(name, version=version, all=both),
        )

    @rule(name=st.sampled_from(NAMES))
    def destroy_all(self, name: str) -> None:
        self._step()
        self._admin_ok(
            f"destroy all of {name!r}",
            lambda: self.model.destroy(name, None, True),
            lambda: self.admin.destroy(name, all=True),
        )

    # --- rules: reads -------------------------------------------------------------------

    @rule(
        who=st.sampled_from((*ENTITIES, AUDITOR, AUDITOR)),
        name=st.sampled_from(NAMES),
        jwt=st.sampled_from(JWT_CASES),
        version=VERSION_CHOICES,
    )
    def get(self, who: str, name: str, jwt: JwtCase, version: VersionChoice) -> None:
        """Latest, pinned (this secret's, another's, not yet issued), or not a number."""
        self._step()
        self._check_get(who, jwt, name, self._version(version, name))

    @rule()
    def list_secrets(self) -> None:
        self._step()

        async def act() -> list[tuple[str, int, int, bool]]:
            listing = await self.admin.list_secrets()
            return [(s.name, s.version, s.versions, s.deleted) for s in listing]

        self._admin_ok("list", self.model.listing, act)

    @rule(entity=st.sampled_from((None, *ENTITIES)))
    def mappings(self, entity: str | None) -> None:
        self._step()
        key = None if entity is None else self.parties[entity].key

        def expect() -> dict[str, list[str]]:
            known = self.model.mappings
            if key is not None:
                return {key: sorted(known.get(key, ()))}
            return {k: sorted(v) for k, v in sorted(known.items())}

        self._admin_ok(f"mappings of {entity}", expect, lambda: self.admin.mappings(key))

    # --- rules: operations on the deployment ----------------------------------------------

    @rule(index=st.integers(0, INSTANCES - 1))
    def restart(self, index: int) -> None:
        """Replace one instance by a new one with the same keys: it must catch up."""
        self._step()
        self.counters.restarts += 1
        self._stop_instance(self.instances[index])
        self.instances[index] = self._start_instance()

    @rule()
    def rebuild(self) -> None:
        """Drop and refold the KV views while the instances run; they must come back equal."""
        self._step()
        self.counters.rebuilds += 1
        nc, layout = self.nc, self._layout()
        assert nc is not None
        self.call(
            lambda: rebuild_views(
                nc,
                backend_name=self.names.name,
                layout=layout,
                barrier=Barrier(self.keys.encryption),
            )
        )
        self.kv_views_match_the_model()

    @precondition(lambda self: self.model.revision > 0)
    @rule()
    def kv_views_match_the_model(self) -> None:
        """The original's buckets hold what the model says, revision by revision."""
        self._step()
        self.counters.kv_checks += 1
        problems = self.call(self._kv_problems)
        assert not problems, "KV views differ from the model:\n" + "\n".join(problems)

    def _layout(self) -> KvLayout:
        return KvLayout(
            secrets_bucket=self.names.secrets_bucket,
            state_bucket=self.names.state_bucket,
            max_history=self.config.max_secret_history,
            replicas=1,
        )

    async def _kv_problems(self) -> list[str]:
        assert self.nc is not None
        js = self.nc.jetstream(timeout=5)
        problems: list[str] = []
        stream = f"KV_{self.names.secrets_bucket}"
        optional = self._beyond_history()
        for revision in range(1, self.model.revision + 1):
            entry = self.model.kv.get(revision)
            try:
                msg = await js.get_msg(stream, seq=revision)
            except nats.js.errors.NotFoundError:
                if entry is not None and revision not in optional:
                    problems.append(f"revision {revision}: missing, expected {_kv_shown(entry)}")
                continue
            if entry is None:
                problems.append(f"revision {revision}: still stored after destroy")
                continue
            subject = f"$KV.{self.names.secrets_bucket}.{entry.name}"
            headers = msg.headers or {}
            if msg.subject != subject:
                problems.append(f"revision {revision}: subject {msg.subject}, expected {subject}")
            elif isinstance(entry, KvDeleted):
                if headers.get("KV-Operation") != "DEL":
                    problems.append(f"revision {revision}: not a delete marker")
            else:
                plain = entry.value.encode() if isinstance(entry.value, str) else entry.value
                if self.at_rest.open(msg.data or b"") != plain:
                    problems.append(f"revision {revision}: sealed value differs")
                if headers.get(KIND_HEADER) != entry.kind:
                    problems.append(f"revision {revision}: kind {headers.get(KIND_HEADER)}")
        state_stream = f"KV_{self.names.state_bucket}"
        for entity, names in self.model.mappings.items():
            subject = f"$KV.{self.names.state_bucket}.{entity}"
            try:
                msg = await js.get_last_msg(state_stream, subject)
            except nats.js.errors.NotFoundError:
                problems.append(f"mapping of {entity}: missing")
                continue
            if msgspec.json.decode(msg.data or b"null") != sorted(names):
                problems.append(f"mapping of {entity}: {msg.data!r}, expected {sorted(names)}")
        return problems

    def _beyond_history(self) -> set[int]:
        """Revisions the bucket's per-key history limit may already have dropped."""
        per_key: dict[str, list[int]] = {}
        for revision, entry in sorted(self.model.kv.items()):
            if entry is not None:
                per_key.setdefault(entry.name, []).append(revision)
        return {r for revisions in per_key.values() for r in revisions[:-MAX_HISTORY]}

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def instances_alive(self) -> None:
        for instance in self.instances:
            if instance.done.done():
                instance.done.result()  # raises what it died of
                raise AssertionError("a backend instance stopped by itself")

    @invariant()
    def views_equal_replay_and_model(self) -> None:
        """Each live view == a fold of the whole log from sequence 0 == the model."""
        views, replay, last_seqs = self.call(self._views_and_replay)
        kept, surviving = replay
        for index, live in enumerate(views):
            diff = live.differences(kept)
            assert not diff, f"instance {index}: live view != replay from 0:\n" + "\n".join(diff)
        assert len(set(last_seqs)) == 1, f"views and replay at log positions {last_seqs}"
        diff = surviving.differences(self.model.projection())
        assert not diff, "replay != model:\n" + "\n".join(diff)

    async def _views_and_replay(
        self,
    ) -> tuple[list[Projection], tuple[Projection, Projection], list[int]]:
        """Projections made on the event loop's thread, where the views change."""
        assert self.nc is not None
        log = EventLog(
            self.nc,
            backend_name=self.names.name,
            barrier=Barrier(self.keys.encryption),
        )
        head = await log.head()
        views, last_seqs = [], []
        for instance in self.instances:
            view = instance.backend.view
            assert view is not None
            await view.wait_applied(head)  # the step's writes are acknowledged: in the log
            views.append(Projection.of(view.state, self.at_rest, as_kept=True))
            last_seqs.append(view.state.last_seq)
        replayed = ViewState()
        async for entry in log.entries():
            fold(replayed, entry.seq, entry.event)
        for name, record in replayed.secrets.items():
            assert record.revisions == sorted(set(record.revisions)), f"{name}: {record.revisions}"
        replay = (
            Projection.of(replayed, self.at_rest, as_kept=True),
            Projection.of(replayed, self.at_rest),
        )
        return views, replay, [*last_seqs, replayed.last_seq]

    @invariant()
    def acknowledged_writes_read_back(self) -> None:
        """A sample of acknowledged puts, read at their revision by the auditor."""
        for name, revision in _rotate(self.acked, self.probe, 2):
            self._check_get(AUDITOR, "valid", name, str(revision))
        self.probe += 1

    @invariant()
    def nobody_reads_outside_its_mapping(self) -> None:
        for entity in ENTITIES:
            outside = [
                n for n in NAMES if n not in self.model.mappings.get(self.parties[entity].key, ())
            ]
            for name in _rotate(outside, self.probe, 1):
                assert self._check_get(entity, "valid", name, None) == ("refused", "Unauthorized")


def _read(secret: wire.Secret) -> tuple[int, Kind, Value]:
    if secret.binary_secret is not None:
        return int(secret.version), "binary", bytes(secret.binary_secret)
    assert secret.string_secret is not None
    return int(secret.version), "string", secret.string_secret


def _kv_shown(entry: KvValue | KvDeleted) -> str:
    return "a delete marker" if isinstance(entry, KvDeleted) else f"a {entry.kind} value"


def _rotate(items: list[T], start: int, count: int) -> Iterator[T]:
    """`count` items from `start` on, cyclically: deterministic, so shrinking replays it."""
    if not items:
        return
    for i in range(min(count, len(items))):
        yield items[(start * count + i) % len(items)]


MODEL_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # Every example starts two backends: a failure still shrinks to a minimal history,
    # but the "explain" phase's hundreds of reruns would cost minutes for little.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


@pytest.mark.timeout(900 if LONG else 600)
def test_backend_matches_the_model(nats_server: NatsServer) -> None:
    counters = Counters()
    with start_blocking_portal(backend="asyncio") as portal:
        run_state_machine_as_test(
            # Any factory will do (hypothesis documents it); its stub says a class.
            lambda: BackendMachine(portal, nats_server.url, counters),  # type: ignore[arg-type]
            settings=MODEL_SETTINGS,
        )
    print(f"model: {counters}")
    assert counters.examples >= min(MAX_EXAMPLES, 5)
    assert counters.steps >= counters.examples  # the rules ran, not only the setup
