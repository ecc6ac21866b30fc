"""The end-of-run leak check fails a whole pytest session that wrote a remembered value.

No server, but two real pytest processes: too slow for the unit tier's budget, so it
runs with the tier of real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path


def test_leak_check_fails_the_session(tmp_path: Path) -> None:
    """End to end: a run whose test writes a remembered value to disk exits 1 and says where."""
    secret = f"leaky-{uuid.uuid4().hex}"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(
        "from support.leakcheck import remember\n"
        "def test_writes(tmp_path, leak_registry):\n"
        f"    remember({secret!r})\n"
        "    assert leak_registry.needles\n"
        f"    (tmp_path / 'store.blk').write_bytes(b'junk' + {secret!r}.encode())\n"
        "def test_keeps(tmp_path):\n"
        f"    remember({secret[::-1]!r})\n"
        "    (tmp_path / 'other.blk').write_text('nothing to see')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def inner(*select: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "support.leakcheck", "-p", "no:cacheprovider",
             "-c", str(tmp_path / "pytest.ini"), "--basetemp", str(tmp_path / "base"),
             "-q", str(tmp_path / "test_inner.py"), *select],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip

    leaky = inner()
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "2 passed" in leaky.stdout
    assert "LEAK:" in leaky.stdout
    assert "store.blk" in leaky.stdout
    assert secret not in leaky.stdout + leaky.stderr
    clean = inner("-k", "keeps")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "leak check: 1 remembered values" in clean.stdout
    assert "LEAK:" not in clean.stdout
