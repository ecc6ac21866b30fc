"""The end-of-run leak check (support/leakcheck.py) can fail: planted values are found.

No server: the scan, its index and the session hook, against files made here.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from support.fuzz import (
    SCALE,
)
from support.leakcheck import MIN_LENGTH, Needle, NeedleIndex, Registry, searchable

# --- the end-of-run leak check (tests/leakcheck.py) can fail --------------------------------


def test_leak_scan_finds_planted_plaintexts(tmp_path: Path) -> None:
    """Planted in the forms a careless write gives a value, at odd offsets: all found."""
    registry = Registry()  # not the session's: these plants are meant to be found
    text, blob = f"planted {uuid.uuid4()} ✓", os.urandom(40)
    registry.remember(text, "string")
    registry.remember(blob, "binary")
    registry.remember("tiny", "short")  # too short to search: ignored, not a false alarm
    registry.remember(b"\x00" * 64, "zeros")  # one distinct byte: ignored likewise
    registry.remember("request_id", "word")  # a field name every event has: ignored likewise
    store = tmp_path / "store" / "jetstream" / "streams"
    store.mkdir(parents=True)
    plants = {
        store / "raw.blk": os.urandom(1001) + text.encode() + os.urandom(7),
        store / "events.json": b'{"sealed":"' + base64.b64encode(b"xk" + blob) + b'"}',
        store / "hex.log": b"value=" + blob.hex().encode(),
        store / "array.json": b'{"binary_secret":[' + ",".join(map(str, blob)).encode() + b"]}",
        store / "escaped.json": json.dumps({"v": text}).encode(),  # ✓ as \\u2713
    }
    for path, data in plants.items():
        path.write_bytes(data)
    (tmp_path / "clean.blk").write_bytes(os.urandom(4096) + b"\x00" * 128 + b'"request_id"')
    exempted = tmp_path / "cli-input.bin"
    exempted.write_bytes(blob)
    registry.exempt(exempted)
    (tmp_path / "link").symlink_to(store / "raw.blk")  # not followed: found once, not twice

    report = registry.scan(tmp_path)

    assert sorted(hit.path for hit in report.hits) == sorted(plants)
    assert report.files == len(plants) + 1
    assert (registry.remembered, registry.protocol_words) == (2, 1)
    for hit in report.hits:
        assert text not in str(hit), "a leak report must not repeat the secret"
        assert blob.hex() not in str(hit)


@settings(max_examples=200 * SCALE, deadline=None)
@given(
    prefix=st.binary(max_size=40),
    value=st.binary(min_size=MIN_LENGTH, max_size=40).filter(searchable),
    suffix=st.binary(max_size=40),
)
def test_leak_index_finds_a_needle_at_any_offset(
    prefix: bytes, value: bytes, suffix: bytes
) -> None:
    """The aligned-word shortcut misses nothing: every offset, every length from 8 on."""
    index = NeedleIndex([Needle(value, "v")])
    data = prefix + value + suffix
    assert [offset for offset, _ in index.occurrences(data)] == [data.find(value)]
