"""The permissions profile grants no role more than the README's table says.

`ALLOWED` below is the table, written down independently of the profile's code: for each
role, the subjects it may publish to and subscribe to, per stream and verb. A property
test then walks random subjects (built from the tokens that matter: this backend's and
another backend's names, every JetStream API verb, wildcards) and checks that whatever
the profile lets a role do, the table lets it do too; and a few rules hold for every
backend name: nobody purges, nobody but the backend serves requests (and then only in
its queue group), nobody subscribes to JetStream API requests or to another role's
inboxes, and nothing reaches another backend's streams. The real server enforcing these
lists is tested in tests/nats/test_permissions.py.
"""

from __future__ import annotations

import functools
import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from secrets_nats_kv import permissions as p
from secrets_nats_kv.app import permissions as rendering
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.permissions import NatsRole, profile
from support.harness import REPO


def covers(pattern: str, subject: str) -> bool:
    """Whether NATS allows `subject` (itself possibly a wildcard) under allow `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have):
            return False
        if have[i] == ">":
            return False
        if token != "*" and (have[i] == "*" or have[i] != token):
            return False
    return len(have) == len(want)


@functools.lru_cache(maxsize=256)
def granted(names: BackendNames, role: NatsRole) -> p.Permissions:
    return profile(names, role)


def publishes(names: BackendNames, role: NatsRole, subject: str) -> bool:
    return any(covers(allowed, subject) for allowed in granted(names, role).publish)


def subscribes(names: BackendNames, role: NatsRole, subject: str, queue: str | None) -> bool:
    for entry in granted(names, role).subscribe:
        allowed, _, only_queue = entry.partition(" ")
        if covers(allowed, subject) and (not only_queue or only_queue == queue):
            return True
    return False


# --- the table ----------------------------------------------------------------------------


def table(names: BackendNames) -> dict[NatsRole, tuple[list[str], list[str]]]:
    """(publish, subscribe) per role, as the README's table states them."""
    n = names.name
    prefix = names.subject_prefix
    events, access = f"SECRETS_{n}_events", f"SECRETS_{n}_access"
    staging = f"SECRETS_{n}_events_rotating"
    secrets_kv, state_kv = f"KV_{names.secrets_bucket}", f"KV_SECRETS_{n}_state"
    api = "$JS.API"

    def verbs(stream: str, *names_: str) -> list[str]:
        return [f"{api}.STREAM.{verb}.{stream}" for verb in names_]

    def consumers(stream: str) -> list[str]:
        return [f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>"]

    backend_pub = [
        f"_INBOX_SNKV.{n}.backend.>",
        f"wasmcloud_secrets_events.{n}.>",
        f"wasmcloud_secrets_access.{n}",
        f"$KV.{names.secrets_bucket}.>",
        f"$KV.SECRETS_{n}_state.>",
        *verbs(events, "INFO", "CREATE", "UPDATE", "MSG.GET", "MSG.DELETE"),
        *consumers(events),
        f"$JS.FC.{events}.>",
        *verbs(access, "INFO", "CREATE", "UPDATE"),
        *verbs(secrets_kv, "INFO", "CREATE", "UPDATE", "MSG.GET", "MSG.DELETE"),
        *verbs(state_kv, "INFO", "CREATE", "UPDATE", "MSG.GET"),
        f"wasmcloud_secrets_anchor.{n}",
        *verbs(f"SECRETS_{n}_anchor", "INFO", "CREATE", "MSG.GET"),
        *verbs(staging, "INFO"),
        *consumers(staging),  # a rotation's committed copy, folded during the refill
        f"$JS.FC.{staging}.>",
    ]
    backend_sub = [
        f"{prefix}.>",  # (queue group only: checked separately)
        f"_INBOX_SNKV.{n}.backend.>",
        *(f"$SRV.{verb}" for verb in ("PING", "INFO", "STATS")),
        *(f"$SRV.{verb}.secrets-nats-kv" for verb in ("PING", "INFO", "STATS")),
        *(f"$SRV.{verb}.secrets-nats-kv.*" for verb in ("PING", "INFO", "STATS")),
        f"$JS.EVENT.ADVISORY.STREAM.CREATED.{events}",  # a rotation's swap: the log recreated,
        f"$JS.EVENT.ADVISORY.STREAM.DELETED.{events}",  # deleted,
        f"$JS.EVENT.ADVISORY.STREAM.DELETED.{staging}",  # staging dropped
    ]
    admin_pub = [
        f"_INBOX_SNKV.{n}.admin.>",
        f"{prefix}.>",
        f"wasmcloud_secrets_rotation_lock.{n}",
        f"wasmcloud_secrets_events.{n}.>",
        f"wasmcloud_secrets_rotating.{n}.>",
        f"$KV.{names.secrets_bucket}.>",
        f"$KV.SECRETS_{n}_state.>",
        *verbs(events, "INFO", "CREATE", "DELETE", "MSG.GET", "MSG.DELETE"),
        f"{api}.DIRECT.GET.{events}",
        *consumers(events),
        f"$JS.FC.{events}.>",
        *verbs(access, "INFO"),
        *consumers(access),
        f"$JS.FC.{access}.>",
        f"wasmcloud_secrets_access.{n}",
        *verbs(access, "MSG.DELETE"),
        "$SRV.STATS.secrets-nats-kv",  # status, rotate-key --online
        "$SRV.STATS.secrets-nats-kv.*",
        *verbs(staging, "INFO", "CREATE", "UPDATE", "DELETE", "MSG.GET", "MSG.DELETE"),
        f"{api}.DIRECT.GET.{staging}",
        *verbs(secrets_kv, "INFO", "CREATE", "DELETE", "MSG.GET", "MSG.DELETE"),
        *verbs(state_kv, "INFO", "CREATE", "DELETE"),
        f"wasmcloud_secrets_anchor.{n}",
        *verbs(f"SECRETS_{n}_anchor", "INFO", "CREATE", "MSG.GET"),
        *consumers(secrets_kv),  # import reads the original's buckets and marks them
        f"$JS.FC.{secrets_kv}.>",
        *consumers(state_kv),
        f"$JS.FC.{state_kv}.>",
        *verbs(secrets_kv, "UPDATE"),
        *verbs(state_kv, "UPDATE"),
        *verbs(access, "DELETE"),  # a failed restore removes what it restored
        *verbs(f"SECRETS_{n}_anchor", "DELETE"),
    ]
    for stream in (secrets_kv, state_kv, f"SECRETS_{n}_anchor", events, access):
        admin_pub += verbs(stream, "SNAPSHOT", "RESTORE")  # backup, restore
        admin_pub.append(f"$JS.SNAPSHOT.RESTORE.{stream}.>")
    admin_sub = [f"_INBOX_SNKV.{n}.admin.>", f"wasmcloud_secrets_rotation_lock.{n}"]
    host_pub = [f"{prefix}.server_xkey", f"{prefix}.get"]
    host_sub = ["_INBOX.>"]
    return {
        NatsRole.BACKEND: (backend_pub, backend_sub),
        NatsRole.ADMIN: (admin_pub, admin_sub),
        NatsRole.HOST: (host_pub, host_sub),
    }


# --- strategies ---------------------------------------------------------------------------

# The same strings as the regex [A-Za-z0-9_-]{1,8}, drawn as text: hypothesis's regex
# strategy costs about a millisecond a draw, most of these tests' run time.
_token = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
backend_names = st.builds(
    lambda name, base, bucket: BackendNames(name=name, subject_base=base, secrets_bucket=bucket),
    _token,
    st.lists(_token, min_size=1, max_size=2).map(".".join),
    _token.map(str.upper),
)
VERBS = [
    *("INFO", "CREATE", "UPDATE", "DELETE", "PURGE", "MSG.GET", "MSG.DELETE", "NAMES", "LIST"),
    *("SNAPSHOT", "RESTORE"),
]


def _streams(names: BackendNames) -> list[str]:
    n = names.name
    return [
        f"SECRETS_{n}_events",
        f"SECRETS_{n}_access",
        f"SECRETS_{n}_events_rotating",
        f"SECRETS_{n}_anchor",
        f"KV_{names.secrets_bucket}",
        f"KV_SECRETS_{n}_state",
    ]


def _api_subjects(names: BackendNames, other: BackendNames) -> st.SearchStrategy[str]:
    """Every JetStream API call on either backend's streams (or a wildcard)."""
    stream = st.sampled_from([*_streams(names), *_streams(other), "*", ">"])
    verb = st.sampled_from(
        [f"STREAM.{v}" for v in VERBS] + ["CONSUMER.CREATE", "CONSUMER.DELETE", "DIRECT.GET"]
    )
    api = st.builds(lambda v, s: f"$JS.API.{v}.{s}", verb, stream)
    flow = stream.map(lambda s: f"$JS.FC.{s}.x")
    return api | flow


def _near_misses(names: BackendNames, other: BackendNames) -> st.SearchStrategy[str]:
    """A granted subject (of this or another backend) with one token changed or wildcarded."""
    known = sorted(
        {
            entry.partition(" ")[0]
            for each in (names, other)
            for role in NatsRole
            for entry in (*granted(each, role).publish, *granted(each, role).subscribe)
        }
    )

    return _mutated(known, ["*", ">", "x", *VERBS, names.name, other.name])


@st.composite  # at module level: hypothesis reads a composite's source where it is made
def _mutated(draw: st.DrawFn, known: list[str], replacements: list[str]) -> str:
    tokens = draw(st.sampled_from(known)).split(".")
    i = draw(st.integers(0, len(tokens) - 1))
    tokens[i] = draw(st.sampled_from(replacements))
    if draw(st.booleans()):
        tokens.append(draw(st.sampled_from(["*", ">", "x"])))
    return ".".join(tokens)


def interesting_subjects(names: BackendNames, other: BackendNames) -> st.SearchStrategy[str]:
    """Subjects near the ones that matter, for this backend and for another one."""
    parts: list[str] = ["$JS.API", "$JS.FC", "$KV", "$SRV", "_INBOX", "_INBOX_SNKV", "*", ">"]
    for each in (names, other):
        n = each.name
        parts += [*_streams(each), n, each.secrets_bucket, f"SECRETS_{n}_state"]
        parts += [each.subject_prefix, "backend", "admin", "get", "server_xkey", "put_secret"]
        parts += [f"wasmcloud_secrets_{kind}.{n}" for kind in ("events", "access", "rotating")]
        parts += [f"wasmcloud_secrets_rotation_lock.{n}"]
    token = st.sampled_from(parts) | _token
    loose = st.lists(token, min_size=1, max_size=6).map(".".join)
    return loose | _api_subjects(names, other) | _near_misses(names, other)


@st.composite
def backend_pairs(draw: st.DrawFn) -> tuple[BackendNames, BackendNames]:
    names = draw(backend_names)
    return names, draw(backend_names.filter(lambda o: o.name != names.name))


@st.composite
def situations(draw: st.DrawFn) -> tuple[BackendNames, BackendNames, str]:
    names, other = draw(backend_pairs())
    return names, other, draw(interesting_subjects(names, other))


Case = tuple[BackendNames, BackendNames, str]


def _valid(subject: str) -> bool:
    tokens = subject.split(".")
    return all(tokens) and ">" not in tokens[:-1]


# --- the properties -----------------------------------------------------------------------


@settings(max_examples=30)  # every grant against every entry of the table: see the rules
@given(backend_names)
def test_no_grant_is_wider_than_the_table(names: BackendNames) -> None:
    """Each allow entry, wildcards and all, lies inside an entry of the table."""
    documented = table(names)
    for role in NatsRole:
        publish, subscribe = documented[role]
        for entry in granted(names, role).publish:
            assert any(covers(allowed, entry) for allowed in publish), (role, entry)
        for entry in granted(names, role).subscribe:
            subject, _, queue = entry.partition(" ")
            assert any(covers(allowed, subject) for allowed in subscribe), (role, entry)
            if covers(subject, f"{names.subject_prefix}.get"):
                assert queue == names.queue_group, (role, entry)  # requests: queue group only


def forbidden(names: BackendNames, other: BackendNames) -> list[tuple[str, str, str | None]]:
    """(publish|subscribe, subject, queue) that no role may ever do."""
    theirs = [stream for stream in _streams(other) if stream not in _streams(names)]
    streams = [*_streams(names), *theirs]
    rules: list[tuple[str, str, str | None]] = []
    rules += [("publish", f"$JS.API.STREAM.PURGE.{stream}", None) for stream in streams]
    rules += [("publish", f"$JS.API.{verb}.{s}", None) for s in theirs for verb in
              ("STREAM.INFO", "STREAM.MSG.GET", "DIRECT.GET", "CONSUMER.CREATE",
               "STREAM.SNAPSHOT", "STREAM.RESTORE", "STREAM.DELETE")]  # fmt: skip
    rules += [("publish", f"$JS.SNAPSHOT.RESTORE.{s}.x", None) for s in theirs]
    rules += [("publish", f"wasmcloud_secrets_events.{other.name}.secret.x", None)]
    rules += [("publish", f"$KV.{other.secrets_bucket}.x", None)] * (
        other.secrets_bucket != names.secrets_bucket
    )
    rules += [("subscribe", f"$JS.API.STREAM.INFO.{stream}", None) for stream in streams]
    rules += [("subscribe", f"$JS.API.CONSUMER.CREATE.{_streams(names)[0]}", None)]
    rules += [("subscribe", f"{names.subject_prefix}.get", queue) for queue in (None, "q")]
    rules += [("subscribe", f"{names.subject_prefix}.server_xkey", None)]
    rules += [("subscribe", f"wasmcloud_secrets_events.{names.name}.secret.x", None)]
    return rules


# Each pair of names costs thousands of subject matches (every forbidden subject against
# every grant of every role), so fewer pairs are drawn than subjects below. A grant that
# breaks one of these rules is built from the names by the same f-strings for every
# backend (names are single tokens: no `.`, `*` or `>`), so it breaks it for almost any
# pair: 30 pairs, hypothesis's simplest first (one-character names, digits, `-` and
# `_`), are plenty to show it. The same holds for a grant wider than the table.
@settings(max_examples=30)
@given(backend_pairs())
def test_the_rules_hold_for_every_backend(pair: tuple[BackendNames, BackendNames]) -> None:
    """Nobody purges, reads JetStream requests, serves requests outside the queue group,
    reads another role's inboxes, or reaches another backend's streams."""
    names, other = pair
    for role in NatsRole:
        for verb, denied, queue in forbidden(names, other):
            allowed = (
                publishes(names, role, denied)
                if verb == "publish"
                else subscribes(names, role, denied, queue)
            )
            assert not allowed, (role, verb, denied, queue)
        for owner in NatsRole:  # a role's inboxes are read by that role only
            prefix = p.inbox_prefix(names, owner)
            if owner is not role and prefix is not None:
                assert not subscribes(names, role, f"{prefix}.reply", None), (role, owner)


@given(situations())
def test_subjects_near_the_grants_agree_with_the_table(case: Case) -> None:
    """Whatever a role may do with a random subject near the grants, the table allows."""
    names, _, subject = case
    documented = table(names)
    for role in NatsRole:
        if _valid(subject):
            if publishes(names, role, subject):
                assert any(covers(a, subject) for a in documented[role][0]), (role, subject)
            if subscribes(names, role, subject, names.queue_group):
                assert any(covers(a, subject) for a in documented[role][1]), (role, subject)


def test_the_table_is_no_wider_than_the_profile() -> None:
    """The table is not a blanket over the profile: each of its entries is granted."""
    names = BackendNames()
    documented = table(names)
    for role in NatsRole:
        granted = profile(names, role)
        assert sorted(documented[role][0]) == sorted(granted.publish), role
        plain = sorted(entry.partition(" ")[0] for entry in granted.subscribe)
        assert sorted(documented[role][1]) == plain, role


def _fenced(language: str, after: str) -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(after) :]
    match = re.search(rf"^```{language}\n(.*?)^```", section, flags=re.M | re.S)
    assert match is not None, (language, after)
    return match.group(1)


def test_the_readme_shows_the_profile_it_ships() -> None:
    names = BackendNames()
    heading = "## Deploying with least privilege"
    assert _fenced("conf", heading) == rendering.render_conf(names, list(NatsRole))
    assert _fenced("sh", heading) == rendering.render_nsc(names, list(NatsRole))
