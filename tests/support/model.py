"""The reference model: what the backend should answer, in plain dicts.

It shares no code with the fold (`projections.state`), so a run of the model against the
fold (tests/unit/test_model_fold.py) or against live backends (tests/nats/test_model.py)
checks one against an independent statement of the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from projections.state import ViewState
from secrets_nats_kv.xkeys import SealBox
from support.strategies import JwtCase, VersionChoice

Kind = Literal["string", "binary"]
Value: TypeAlias = str | bytes
Outcome: TypeAlias = tuple[str, object]  # ("ok", result) or ("refused", wire variant)

# --- the model ------------------------------------------------------------------------------


class Refusal(Exception):
    """The model's prediction that the backend refuses, with the protocol variant it names."""

    def __init__(self, variant: str) -> None:
        super().__init__(variant)
        self.variant = variant


@dataclass
class MVersion:
    origin: int  # the put whose bytes these are (an undelete copies them)
    kind: Kind
    value: Value

    def plain(self) -> bytes:
        return self.value.encode() if isinstance(self.value, str) else self.value


@dataclass
class MSecret:
    """A secret's surviving KV entries: destroy takes entries away, as from the bucket.

    A destroyed version is gone, as if never put: it is not among the revisions (so not
    in a later `destroy all`'s answer), and a secret with no entry left does not exist.
    """

    revisions: list[int] = field(default_factory=list)  # surviving entries, oldest first
    versions: dict[int, MVersion] = field(default_factory=dict)  # the value-bearing ones
    markers: set[int] = field(default_factory=set)  # the delete markers

    def newest_readable(self) -> int | None:
        readable = [r for r in self.revisions if r in self.versions]
        return readable[-1] if readable else None

    @property
    def deleted(self) -> bool:
        """The newest entry is a delete marker (a KV reader sees the key deleted)."""
        return bool(self.revisions) and self.revisions[-1] in self.markers

    def latest(self) -> int | None:
        return None if self.deleted else self.newest_readable()


@dataclass(frozen=True)
class KvValue:
    name: str
    kind: Kind
    value: Value


@dataclass(frozen=True)
class KvDeleted:
    name: str


KvEntry: TypeAlias = KvValue | KvDeleted | None  # None: erased by destroy


def parse_u64(text: str | None) -> int | None:
    """Rust's `u64::from_str`, the original's reading of `version` (None: latest)."""
    if text is None:
        return None
    digits = text[1:] if text.startswith("+") else text
    if not digits or any(c not in "0123456789" for c in digits):
        raise Refusal("InvalidRequest")
    value = int(digits)
    if value >= 2**64:
        raise Refusal("InvalidRequest")
    return value


@dataclass
class Model:
    """What the backend should answer, in plain dicts sharing no code with the fold.

    The protocol's rules (PROTOCOL.md §3, §5), and the lifecycle rules the design states:
    a version is a KV revision, deleted means the newest surviving entry is a marker,
    undelete copies the newest surviving value, copies of one value are shredded together.
    """

    revision: int = 0  # the secrets bucket's last revision: one per put, delete, undelete
    secrets: dict[str, MSecret] = field(default_factory=dict)
    mappings: dict[str, set[str]] = field(default_factory=dict)
    kv: dict[int, KvEntry] = field(default_factory=dict)
    fenced: bool = False  # an online key rotation's write fence: every write is refused

    def fence(self) -> None:
        self.fenced = True

    def lift(self) -> None:
        self.fenced = False

    def _writable(self) -> None:
        """Writes wait for the rotation (a get never does); a replay is not modelled."""
        if self.fenced:
            raise Refusal("RotationInProgress")

    def _next(self) -> int:
        self.revision += 1
        return self.revision

    def _existing(self, name: str) -> MSecret:
        secret = self.secrets.get(name)
        if secret is None:
            raise Refusal("SecretNotFound")
        return secret

    def put(self, name: str, value: Value) -> int:
        self._writable()
        kind: Kind = "string" if isinstance(value, str) else "binary"
        revision = self._next()
        secret = self.secrets.setdefault(name, MSecret())
        secret.revisions.append(revision)
        secret.versions[revision] = MVersion(revision, kind, value)
        self.kv[revision] = KvValue(name, kind, value)
        return revision

    def map(self, entity: str, names: list[str], *, add: bool) -> None:
        self._writable()
        allowed = self.mappings.setdefault(entity, set())
        if add:
            allowed.update(names)
        else:
            allowed.difference_update(names)

    def delete(self, name: str) -> int:
        self._writable()
        secret = self._existing(name)
        if secret.latest() is None:
            raise Refusal("SecretNotFound")
        revision = self._next()
        secret.revisions.append(revision)
        secret.markers.add(revision)
        self.kv[revision] = KvDeleted(name)
        return revision

    def undelete(self, name: str) -> int:
        self._writable()
        secret = self._existing(name)
        source = secret.newest_readable()
        if source is None:
            raise Refusal("SecretNotFound")  # only delete markers left: nothing to restore
        if not secret.deleted:
            raise Refusal("InvalidRequest")
        copied = secret.versions[source]
        revision = self._next()
        secret.revisions.append(revision)
        secret.versions[revision] = MVersion(copied.origin, copied.kind, copied.value)
        self.kv[revision] = KvValue(name, copied.kind, copied.value)
        return revision

    def destroy(self, name: str, version: int | None, all_: bool) -> list[int]:
        if all_ == (version is not None):
            raise Refusal("InvalidRequest")
        self._writable()
        secret = self._existing(name)
        if all_:
            shredded = list(secret.revisions)  # markers too: the key is gone from the bucket
        else:
            chosen = secret.versions.get(version) if version is not None else None
            if chosen is None:
                raise Refusal("SecretNotFound")
            # Copies of the same bytes go together, or the value would stay readable.
            shredded = [r for r, v in secret.versions.items() if v.origin == chosen.origin]
        for revision in shredded:
            secret.revisions.remove(revision)
            secret.versions.pop(revision, None)
            secret.markers.discard(revision)
            self.kv[revision] = None
        if not secret.revisions:
            del self.secrets[name]
        return sorted(shredded)

    def get(
        self, entity: str, jwt: JwtCase, name: str, version: str | None
    ) -> tuple[int, Kind, Value]:
        if jwt in ("expired", "not_yet_valid"):
            raise Refusal("InvalidEntityJWT")
        if jwt == "expired_host":
            raise Refusal("InvalidHostJWT")
        if name not in self.mappings.get(entity, ()):
            raise Refusal("Unauthorized")
        wanted = parse_u64(version)
        secret = self.secrets.get(name)
        if secret is None or secret.deleted:
            raise Refusal("SecretNotFound")
        revision = secret.latest() if wanted is None else wanted
        if revision is None or revision not in secret.versions:
            raise Refusal("SecretNotFound")
        found = secret.versions[revision]
        return revision, found.kind, found.value

    def listing(self) -> list[tuple[str, int, int, bool]]:
        rows = []
        for name, secret in sorted(self.secrets.items()):
            rows.append((name, secret.latest() or 0, len(secret.versions), secret.deleted))
        return rows

    def projection(self) -> Projection:
        return Projection(
            secrets={
                name: (
                    secret.deleted,
                    tuple(secret.revisions),
                    {r: (v.origin, v.kind, v.plain()) for r, v in secret.versions.items()},
                )
                for name, secret in self.secrets.items()
            },
            mappings={entity: frozenset(names) for entity, names in self.mappings.items()},
            secrets_revision=self.revision,
        )


SecretView: TypeAlias = tuple[bool, tuple[int, ...], dict[int, tuple[int, str, bytes]]]


@dataclass(frozen=True)
class Projection:
    """What a view means to a client: per secret (deleted, revisions, readable versions)."""

    secrets: dict[str, SecretView]
    mappings: dict[str, frozenset[str]]
    secrets_revision: int

    @classmethod
    def of(cls, state: ViewState, at_rest: SealBox, *, as_kept: bool = False) -> Projection:
        """A view as clients can tell: its surviving entries (readable values, markers).

        `as_kept` keeps every revision and record the view holds instead, destroyed ones
        too: two views of one log must agree on those as well, since replies (a `destroy
        all`'s list, the error for a secret with nothing left) are made from them.
        """
        secrets: dict[str, SecretView] = {}
        for name, record in state.secrets.items():
            readable: dict[int, tuple[int, str, bytes]] = {
                v.revision: (v.origin, v.kind, at_rest.open(v.sealed))
                for v in record.versions.values()
                if v.sealed is not None
            }
            surviving = tuple(r for r in record.revisions if r in readable or r in record.markers)
            if as_kept or surviving:
                kept = tuple(record.revisions) if as_kept else surviving
                secrets[name] = (record.deleted, kept, readable)
        return cls(
            secrets=secrets,
            mappings={entity: frozenset(names) for entity, names in state.mappings.items()},
            secrets_revision=state.secrets_revision,
        )

    def differences(self, other: Projection) -> list[str]:
        """Readable differences (never values: only their lengths)."""
        out = []
        for name in sorted(set(self.secrets) | set(other.secrets)):
            mine, theirs = self.secrets.get(name), other.secrets.get(name)
            if mine != theirs:
                out.append(f"secret {name!r}: {_describe(mine)} != {_describe(theirs)}")
        if self.mappings != other.mappings:
            out.append(f"mappings {self.mappings} != {other.mappings}")
        if self.secrets_revision != other.secrets_revision:
            out.append(f"secrets revision {self.secrets_revision} != {other.secrets_revision}")
        return out


def _describe(view: SecretView | None) -> str:
    if view is None:
        return "absent"
    deleted, revisions, readable = view
    shown = {
        r: (origin, kind, f"{len(value)} bytes") for r, (origin, kind, value) in readable.items()
    }
    return f"(deleted={deleted}, revisions={list(revisions)}, readable={shown})"


def outcome(fn: Callable[[], object]) -> Outcome:
    try:
        return ("ok", fn())
    except Refusal as refusal:
        return ("refused", refusal.variant)


def shown(result: Outcome) -> str:
    """An outcome for an assertion message: values by length only."""
    status, value = result
    if status == "ok" and isinstance(value, tuple) and len(value) == 3:
        revision, kind, data = value
        return f"ok(version {revision}, {kind}, {len(data)} bytes/chars)"
    return f"{status}({value})"


def concrete_version(model: Model, choice: VersionChoice, name: str) -> str | None:
    """A drawn version choice made concrete against the revisions `model` issued so far."""
    if choice is None or isinstance(choice, str):
        return choice  # latest, or an odd text
    kind, n = choice
    own = model.secrets.get(name)
    if kind == "own" and own is not None:
        return str(own.revisions[n % len(own.revisions)])  # a value or a delete marker
    if kind in ("own", "issued") and model.revision:
        return str(n % model.revision + 1)  # any revision: maybe another secret's
    return str(model.revision + n % 50 + 1)  # not issued yet
