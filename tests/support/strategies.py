"""Hypothesis strategies and constants shared by the model runs (unit and NATS tiers).

Draws never depend on the state (hypothesis replays them); a run makes them concrete.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from hypothesis import strategies as st

# Valid KV keys from a small alphabet, so that writes collide on the same secret.
NAMES = ("a", "b", "c.d", "x/y", "e=f", "G_h-1")
ENTITIES = ("comp1", "comp2", "prov")  # two components and a provider; rules change these
AUDITOR = "auditor"  # mapped to every name at the start, never changed: reads back writes
# Version texts a host may send, each with a known reading under Rust's u64::from_str.
# (U+0661 is a digit to Python's str.isdigit, not to Rust; 2**64 is one past u64::MAX.)
ODD_VERSIONS = (
    "0",
    "007",
    "+1",
    "",
    "abc",
    "-1",
    " 1",
    "1.0",
    "\u0661",
    str(2**64 - 1),
    str(2**64),
)
JwtCase = Literal["valid", "expired", "not_yet_valid", "expired_host"]
JWT_CASES: tuple[JwtCase, ...] = (
    "valid",
    "valid",
    "valid",
    "expired",
    "not_yet_valid",
    "expired_host",
)

VersionChoice: TypeAlias = str | tuple[str, int] | None
REVISION_CHOICES = st.tuples(st.sampled_from(["own", "issued", "future"]), st.integers(0, 1000))
VERSION_CHOICES: st.SearchStrategy[VersionChoice] = st.one_of(
    st.none(), REVISION_CHOICES, REVISION_CHOICES, st.sampled_from(ODD_VERSIONS)
)


def operations(
    names: tuple[str, ...], *, reads: bool = True
) -> st.SearchStrategy[tuple[object, ...]]:
    """One model operation on `names`, drawn whole: a run applies a list of them to the
    model and to the system under test, in order. Few names: more operations collide."""
    values = st.one_of(st.text(max_size=8), st.binary(max_size=8))
    name = st.sampled_from(names)
    writes = [
        st.tuples(st.just("put"), name, values),
        st.tuples(
            st.just("map"),
            st.sampled_from(ENTITIES),
            st.lists(name, min_size=1, max_size=3),
            st.booleans(),
        ),
        st.tuples(st.just("delete"), name),
        st.tuples(st.just("undelete"), name),
        st.tuples(st.just("destroy"), name, REVISION_CHOICES),
        st.tuples(st.just("destroy_all"), name),
    ]
    if not reads:
        return st.one_of(writes)
    return st.one_of(
        *writes,
        st.tuples(
            st.just("get"),
            st.sampled_from((*ENTITIES, AUDITOR)),
            name,
            st.sampled_from(JWT_CASES),
            VERSION_CHOICES,
        ),
        st.tuples(st.just("list")),
    )


HISTORIES = st.lists(operations(NAMES[:2]), max_size=30)

_SMALL_VALUES: tuple[str | bytes, ...] = ("", "v", "\u00e9\u4e2d", b"", b"\x00\xff", b"bin")
_WRITES = ("put", "map", "delete", "undelete", "destroy", "destroy_all")
_REVISION_KINDS = ("own", "issued", "future")


def write_operation(code: int, names: tuple[str, ...] = NAMES[:2]) -> tuple[object, ...]:
    """One write operation decoded from one byte: the same operations as `operations`,
    at a fraction of the drawing cost (a history is one drawn byte string), so a run can
    afford thousands of histories. Hypothesis shrinks the bytes, so failures still shrink."""
    code, which = divmod(code, len(_WRITES))
    code, n = divmod(code, len(names))
    name, op = names[n], _WRITES[which]
    if op == "put":
        return ("put", name, _SMALL_VALUES[code % len(_SMALL_VALUES)])
    if op == "map":
        entity = ENTITIES[code % len(ENTITIES)]
        code //= len(ENTITIES)
        chosen = [names[i] for i in range(len(names)) if (code >> (1 + i)) & 1] or [name]
        return ("map", entity, chosen, bool(code & 1))
    if op == "destroy":
        kind = _REVISION_KINDS[code % len(_REVISION_KINDS)]
        return ("destroy", name, (kind, code // len(_REVISION_KINDS)))
    return (op, name)


WRITE_HISTORIES = st.binary(min_size=10, max_size=30).map(
    lambda codes: [write_operation(code) for code in codes]
)
