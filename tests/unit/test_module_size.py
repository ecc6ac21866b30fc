"""No product module grows past about 400 lines: a module that large does several jobs.

Issue 11's rule, kept: when this fails, split the module along its seams (move whole
functions into a module named for their one job) rather than raise the limit.
"""

from __future__ import annotations

from pathlib import Path

from support.harness import REPO

PRODUCT = ("secrets_nats_kv", "events", "projections", "actors")
MAX_LINES = 430  # "about 400": room for a docstring line or two, not for a second job


def product_modules() -> list[Path]:
    files = sorted(f for room in PRODUCT for f in (REPO / room).rglob("*.py"))
    assert len(files) > 30, "the product's modules were not found"
    return files


def test_no_product_module_is_over_about_400_lines() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for path in product_modules()
    }
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"split these modules along their seams: {too_long}"
