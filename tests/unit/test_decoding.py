"""Decode failures are explained in this project's words, never in msgspec's.

A library's message text changes between releases (msgspec 0.23 reworded bad UTF-8), so
the reasons a host or an operator reads must come from a closed set of our own phrases.
"""

from __future__ import annotations

import re

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.decoding import why_undecodable


class _Shape(msgspec.Struct):
    name: str
    count: int = 0


_OURS = re.compile(
    r"not UTF-8|nested too deeply|not JSON|not a JSON object|not of the expected shape"
    r"|its fields do not fit together|`(name|count)` (is missing|has the wrong type or value"
    r"|is nested too deeply)"
)


def test_each_kind_of_failure_has_its_reason() -> None:
    assert why_undecodable(b'{"name":"\xff"}', _Shape) == "not UTF-8"
    assert why_undecodable(b'{"name":', _Shape) == "not JSON"
    assert why_undecodable(b"[1]", _Shape) == "not a JSON object"
    assert why_undecodable(b"{}", _Shape) == "`name` is missing"
    assert why_undecodable(b'{"name":1}', _Shape) == "`name` has the wrong type or value"
    assert why_undecodable(b'{"name":"a","count":"x"}', _Shape) == (
        "`count` has the wrong type or value"
    )
    assert why_undecodable(b"[" * 100_000 + b"]" * 100_000, _Shape) == "nested too deeply"
    assert why_undecodable(b'"x"', list[str]) == "not of the expected shape"


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_every_reason_is_one_of_ours(data: bytes) -> None:
    assert _OURS.fullmatch(why_undecodable(data, _Shape))
