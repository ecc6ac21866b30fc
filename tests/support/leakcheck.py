"""pytest plugin: at the end of the run, no secret a test stored is anywhere on disk.

Tests `remember()` every plaintext, seed and JWT they hand to the backend. When the
session finishes, every file under pytest's base temp directory (which holds every
nats-server store, log and CLI output the fixtures made) is searched for each of them,
and the session fails if one is found. A secret at rest must only exist sealed.

Besides the raw bytes, each value is searched in the forms a careless write would give
it: JSON-escaped, base64 (events encode `bytes` fields so; all three alignments), hex,
and the JSON byte array of `binary_secret`. Values shorter than 8 bytes or made of fewer
than 4 distinct bytes are not searched: they occur by chance in any binary file. Nor are
values that occur in the backend's own source (a field name, a subject, a header): those
are protocol words every store holds, and Hypothesis draws them on purpose, since it
seeds its text and bytes with the string constants of the code under test.

Speed: each file is read once, cut into aligned 8-byte words (4-byte for needles under 15
bytes), and intersected (in C) with the windows that start each needle (offsets 0-7, or
0-3); only needles sharing a word with the file are then searched for in full. Any
occurrence of a needle has one of those windows on an aligned word, so nothing is missed.
Files over 64 MiB are not read (JetStream test stores are far smaller): they are listed
as unscanned, never passed silently. The secrets bucket is S2-compressed on disk: in
stores as small as a test's its blocks were seen uncompressed, but a file scan cannot
promise that, which is why `test_no_leak` also reads every stream back through the server.

Registered by `pytest_plugins = ["leakcheck"]` in conftest.py; tests reach the registry
through `remember()` or the `leak_registry` fixture, and `exempt()` a file they wrote a
plaintext to on purpose (e.g. the input of `put --binary FILE`).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from secrets_nats_kv.app.client import AdminClient

MIN_LENGTH = 8
MIN_DISTINCT_BYTES = 4
MIN_ENCODED = 16
MAX_FILE_BYTES = 64 * 1024 * 1024
RUNTIME_PACKAGES = ("secrets_nats_kv", "events", "projections", "actors")
_WORD = 4  # bytes per aligned word; needles must be at least 2 * _WORD - 1 long


@dataclass(frozen=True, slots=True)
class Needle:
    """One searchable form of a remembered value; `label` never shows the value."""

    data: bytes
    label: str


@dataclass(frozen=True, slots=True)
class Hit:
    path: Path
    offset: int
    label: str

    def __str__(self) -> str:
        return f"{self.path} @ byte {self.offset}: {self.label}"


def forms(value: str | bytes) -> dict[str, bytes]:
    """The encodings of `value` a leak could take on disk, by name.

    Encoded forms shorter than 16 bytes are left out: their short alphabets (hex, base64)
    fill whole files, so they would match by chance and make every scan slow.
    """
    raw = value.encode() if isinstance(value, str) else value
    found: dict[str, bytes] = {"raw": raw}
    encoded: dict[str, bytes] = {}
    if isinstance(value, str):
        encoded["json"] = msgspec.json.encode(value)[1:-1]
        encoded["json-ascii"] = json.dumps(value)[1:-1].encode()
    encoded["hex"] = raw.hex().encode()
    encoded["byte-array"] = ",".join(str(b) for b in raw).encode()
    for skip in range(3):  # base64 of the value as it sits at any offset mod 3
        aligned = raw[skip : skip + (len(raw) - skip) // 3 * 3]
        encoded[f"base64+{skip}"] = base64.b64encode(aligned)
        encoded[f"base64url+{skip}"] = base64.urlsafe_b64encode(aligned)
    found.update((form, data) for form, data in encoded.items() if len(data) >= MIN_ENCODED)
    return found


def searchable(raw: bytes) -> bool:
    """Long and varied enough not to turn up by chance in unrelated bytes."""
    return len(raw) >= MIN_LENGTH and len(set(raw)) >= MIN_DISTINCT_BYTES


@functools.cache
def own_source() -> bytes:
    """The text of every module of the backend: the words it writes to every store."""
    root = Path(__file__).resolve().parents[2]
    files = sorted(f for package in RUNTIME_PACKAGES for f in (root / package).rglob("*.py"))
    assert files, f"no backend source under {root}"
    return b"\n".join(f.read_bytes() for f in files)


@dataclass
class Registry:
    """Values that must never be found at rest, and files allowed to hold them."""

    needles: dict[bytes, str] = field(default_factory=dict)
    exempt_paths: set[Path] = field(default_factory=set)
    remembered: int = 0
    protocol_words: int = 0

    def remember(self, value: str | bytes, what: str = "value") -> None:
        """Register a plaintext (or seed, or JWT) a test gave the backend."""
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if not searchable(raw):
            return
        if raw in own_source():
            self.protocol_words += 1
            return
        self.remembered += 1
        where = os.environ.get("PYTEST_CURRENT_TEST", "outside a test").rsplit(" ", 1)[0]
        origin = f"{what} #{self.remembered} ({len(raw)} bytes, remembered in {where})"
        for form, needle in forms(value).items():
            if searchable(needle):
                self.needles.setdefault(needle, f"{origin} as {form}")

    def exempt(self, path: str | os.PathLike[str]) -> None:
        """A file (or directory) a test wrote plaintext to on purpose."""
        self.exempt_paths.add(Path(path).resolve())

    def is_exempt(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved == p or p in resolved.parents for p in self.exempt_paths)

    def scan(self, root: Path) -> ScanReport:
        return scan(root, [Needle(d, label) for d, label in self.needles.items()], self.is_exempt)


class _WordIndex:
    """Windows of `size` bytes at needle offsets 0 to size-1, to pick candidates in C.

    A needle found at file offset p has the aligned word at p + (-p % size) inside it,
    at needle offset -p % size, provided it is at least 2 * size - 1 bytes long.
    """

    def __init__(self, needles: Iterable[Needle], size: int, code: str) -> None:
        assert struct.calcsize(code) == size
        self.size, self.code = size, code
        self.by_word: dict[int, list[Needle]] = {}
        for needle in needles:
            for i in range(size):
                word = int.from_bytes(needle.data[i : i + size], sys.byteorder)
                bucket = self.by_word.setdefault(word, [])
                if not bucket or bucket[-1] is not needle:
                    bucket.append(needle)
        self.words = frozenset(self.by_word)

    def candidates(self, data: bytes) -> Iterator[Needle]:
        usable = len(data) - len(data) % self.size
        words = memoryview(data)[:usable].cast(self.code)  # type: ignore[call-overload]
        for word in self.words.intersection(words):
            yield from self.by_word[word]


class NeedleIndex:
    """Finds many needles in one pass: 8-byte words for long needles, 4-byte for short ones.

    Long words keep candidates rare even in files full of base64 or hex, where 4-byte
    windows of the base64 forms would match by chance all the time.
    """

    def __init__(self, needles: Iterable[Needle]) -> None:
        needles = list(needles)
        for needle in needles:
            if len(needle.data) < 2 * _WORD - 1:
                raise ValueError(f"needle shorter than {2 * _WORD - 1} bytes: {needle.label}")
        wide = 2 * _WORD
        self._indexes = [
            _WordIndex([n for n in needles if len(n.data) < 2 * wide - 1], _WORD, "I"),
            _WordIndex([n for n in needles if len(n.data) >= 2 * wide - 1], wide, "Q"),
        ]

    def occurrences(self, data: bytes) -> Iterator[tuple[int, Needle]]:
        """Each needle found in `data`, with the offset of its first occurrence."""
        candidates = {id(n): n for index in self._indexes for n in index.candidates(data)}
        for needle in candidates.values():
            offset = data.find(needle.data)
            if offset >= 0:
                yield offset, needle


@dataclass
class ScanReport:
    hits: list[Hit] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    unscanned: list[Path] = field(default_factory=list)


def scan(
    root: Path, needles: list[Needle], exempt: Callable[[Path], bool] | None = None
) -> ScanReport:
    """Search every regular file under `root` (symlinks not followed) for every needle."""
    report = ScanReport()
    if not needles or not root.is_dir():
        return report
    index = NeedleIndex(needles)
    skip = exempt or (lambda _path: False)
    for directory, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(directory, name)
            try:
                info = path.lstat()
            except OSError:
                continue  # removed while we walked
            if not stat.S_ISREG(info.st_mode) or skip(path):
                continue
            if info.st_size > MAX_FILE_BYTES:
                report.unscanned.append(path)
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            report.files += 1
            report.bytes += len(data)
            report.hits.extend(Hit(path, offset, n.label) for offset, n in index.occurrences(data))
    return report


REGISTRY = Registry()
remember = REGISTRY.remember
exempt = REGISTRY.exempt
T = TypeVar("T", str, bytes)


def remembered(value: T, what: str = "value") -> T:
    """`value`, remembered: for wrapping where a token or seed is made."""
    remember(value, what)
    return value


class RememberingAdminClient(AdminClient):
    """The admin client, registering every value it stores with the leak check."""

    async def put_secret(self, name: str, value: str | bytes) -> int:
        remember(value, "put_secret value")
        return await super().put_secret(name, value)


@pytest.fixture
def leak_registry() -> Registry:
    """The session's registry: `remember(value)` what you store, `exempt(path)` what you wrote."""
    return REGISTRY


def _base_temp(config: pytest.Config) -> Path | None:
    """The run's base temp dir if a test made it; asking pytest for it would create it."""
    made = getattr(getattr(config, "_tmp_path_factory", None), "_basetemp", None)
    return None if made is None else Path(made)


@pytest.hookimpl(tryfirst=True)  # before any plugin that cleans up the temp dirs
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    root = _base_temp(session.config)
    if root is None or not REGISTRY.needles:
        return
    report = REGISTRY.scan(root)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str, **markup: bool) -> None:
        if reporter is not None:
            reporter.write_line(line, **markup)
        else:
            sys.stderr.write(line + "\n")

    if reporter is not None:
        reporter.write_sep("-", "leak check", red=bool(report.hits))
    say(
        f"leak check: {REGISTRY.remembered} remembered values ({len(REGISTRY.needles)} forms) "
        f"searched in {report.files} files ({report.bytes / 1e6:.1f} MB) under {root}; "
        f"{REGISTRY.protocol_words} values skipped as words of the backend's own source"
    )
    for path in report.unscanned:
        say(f"leak check: NOT scanned (over {MAX_FILE_BYTES >> 20} MiB): {path}", yellow=True)
    if report.hits:
        for hit in report.hits:
            say(f"LEAK: {hit}", red=True, bold=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
