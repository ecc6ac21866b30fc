"""The interop vectors of `shared/vectors/interop.json`, made by NATS's own nkeys library.

Path: `$SECRETS_NATS_KV_VECTORS`, else `<repo root>/../shared/vectors/interop.json`.  A
test that needs them skips (saying where it looked) only when the file is absent.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest

VECTORS_PATH = Path(
    os.environ.get("SECRETS_NATS_KV_VECTORS")
    or Path(__file__).resolve().parent.parent.parent / "shared" / "vectors" / "interop.json"
)


@functools.cache
def load_vectors() -> dict[str, Any] | None:
    """The parsed vectors, or None when the file is absent (a corrupt file fails loudly)."""
    if not VECTORS_PATH.is_file():
        return None
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return data


def require_vectors() -> dict[str, Any]:
    """The vectors, or skip the calling test."""
    data = load_vectors()
    if data is None:
        pytest.skip(f"interop vectors not found at {VECTORS_PATH}")
    return data


def entries(*path: str) -> list[Any]:
    """The list at `path`, as pytest params; a single None when absent (see `need`)."""
    data: Any = load_vectors()
    if data is None:
        return [pytest.param(None, id="no-vectors")]
    for key in path:
        data = data[key]
    return [
        pytest.param(
            entry, id=str(entry.get("name") or entry.get("why") or entry.get("role") or index)
        )
        for index, entry in enumerate(data)
    ]


def need(entry: Any) -> Any:
    """The parametrized entry, or skip the test when the vectors file is absent."""
    if entry is None:
        require_vectors()
    return entry
