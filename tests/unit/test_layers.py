"""Layers look only down: no product module imports a room above its own.

From the bottom: the kernel (`secrets_nats_kv`: keys, sealing, JWTs, wire types,
names, config, errors), the NATS adapter (`secrets_nats_kv.nats`), `events`,
`projections`, `actors`, and the application shell (`secrets_nats_kv.app`) on top.
Lazy imports inside functions count too: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support.harness import REPO

LAYERS = (
    "secrets_nats_kv",
    "secrets_nats_kv.nats",
    "events",
    "projections",
    "actors",
    "secrets_nats_kv.app",
)
PRODUCT = ("secrets_nats_kv", "events", "projections", "actors")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the deepest room `module` lies in; None outside the product."""
    rooms = [i for i, room in enumerate(LAYERS) if module == room or module.startswith(room + ".")]
    return max(rooms, key=lambda i: len(LAYERS[i]), default=None)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def product_files() -> list[Path]:
    files = sorted(f for room in PRODUCT for f in (REPO / room).rglob("*.py"))
    assert len(files) > 30, "the product's modules were not found"
    return files


def test_layers_are_ordered_as_documented() -> None:
    assert layer_of("secrets_nats_kv.errors") == 0
    assert layer_of("secrets_nats_kv.nats.jetstream") == 1
    assert layer_of("actors.backend") == 4
    assert layer_of("secrets_nats_kv.app.cli") == 5
    assert layer_of("nats.errors") is None


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    module = module_name(path)
    own = layer_of(module)
    assert own is not None
    upward = [
        f"line {line}: {imported} ({LAYERS[layer]})"
        for line, imported in imports_of(path, module)
        if (layer := layer_of(imported)) is not None and layer > own
    ]
    assert not upward, f"{module} ({LAYERS[own]}) imports from above:\n" + "\n".join(upward)


def test_the_walk_finds_an_upward_import(tmp_path: Path) -> None:
    """The check itself has teeth: a planted upward import, lazy and relative, is found."""
    source = "def f():\n    from .app import cli\n    import actors.backend\n"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = [name for _, name in imports_of(probe, "secrets_nats_kv.errors")]
    assert "secrets_nats_kv.app.cli" in found
    assert "actors.backend" in found
