"""The interop vectors made by NATS's own nkeys library (shared/vectors/interop.json).

The repo keeps its own copy (tests/support/data/interop.json: data, not code), so a
clone without `../shared/` still runs every vector check; `$SECRETS_NATS_KV_VECTORS`
points elsewhere. A missing or unreadable file fails the tests that need it: a vector
check that skips proves nothing.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO_COPY = Path(__file__).resolve().parent / "data" / "interop.json"
SHARED_COPY = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "interop.json"
VECTORS_PATH = Path(os.environ.get("SECRETS_NATS_KV_VECTORS") or REPO_COPY)


@functools.cache
def load_vectors() -> dict[str, Any]:
    """The parsed vectors; a missing or corrupt file fails loudly."""
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return data


def entries(*path: str) -> list[Any]:
    """The list at `path`, as pytest params, one per entry."""
    data: Any = load_vectors()
    for key in path:
        data = data[key]
    assert data, f"no vectors at {'/'.join(path)} in {VECTORS_PATH}"
    return [
        pytest.param(
            entry, id=str(entry.get("name") or entry.get("why") or entry.get("role") or index)
        )
        for index, entry in enumerate(data)
    ]
