"""`python -m bench.bench_import [--entries N]`: how fast `import` takes over a deployment.

The budget (issue 13) is 100 000 entries of the original's buckets imported in at most
60 s on this machine. This starts its own nats-server, fills buckets made as the
original makes them (`tests/support/original.py`: the KV API's stream config) with N
entries sealed by the encryption key to itself — N/50 secrets of 50 versions each, plus
`--over` secrets written past the 64-entry history so part of the history is skipped —
and one mapping per 10 secrets, then runs `import_original` end to end and reports:

- filling the original's buckets (set-up, pipelined publishes, for reference);
- the import's phases, split where its progress calls start counting again: read and
  check (both buckets read, every value opened, the plan made), append (pipelined,
  tagged appends of the planned events; then the original's streams dropped, the new
  ones made and the log read back for the refold), replace (the pinned, pipelined
  writes of both buckets and the erasures of skipped revisions' placeholders);
- the whole import, in entries/second and as a fraction of the 60 s budget.

It prints a table and writes `bench/results/import.json` (`--output` to change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from actors.takeover.importer import import_original
from bench.single_server import rate_table, report, run_on_a_fresh_server
from projections.kv import KvLayout
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import kv_stream, kv_subject_prefix
from secrets_nats_kv.xkeys import SealBox, XKey
from tests.support.original import ORIGINAL_HISTORY, original_stream_config

NAMES = BackendNames()
LAYOUT = KvLayout(secrets_bucket=NAMES.secrets_bucket, state_bucket=NAMES.state_bucket)
VERSIONS = 50
BUDGET_S = 60.0


async def fill(nc: NATS, entries: int, over: int, key: XKey) -> dict[str, int]:
    """The original's buckets with `entries` messages in the secrets bucket when done."""
    js = nc.jetstream(timeout=10)
    await js.add_stream(original_stream_config(NAMES.secrets_bucket, ORIGINAL_HISTORY))
    await js.add_stream(original_stream_config(NAMES.state_bucket, 1))
    box = SealBox(key, key)
    prefix = kv_subject_prefix(NAMES.secrets_bucket)
    written = 0
    over_writes = ORIGINAL_HISTORY + 36  # each keeps 64, 36 revisions skipped
    plain = max(0, (entries - over * ORIGINAL_HISTORY) // VERSIONS)
    stream = kv_stream(NAMES.secrets_bucket)
    async with PositionedPublisher(nc, stream, expect_stream=False) as publisher:
        for version in range(over_writes):
            for i in range(plain + over):
                if i >= plain or version < VERSIONS:
                    written += 1
                    value = f"value {i} v{version}".encode()
                    await publisher.publish(written, f"{prefix}app-{i:05d}", box.seal(value))
        await publisher.drain()
    state_prefix = kv_subject_prefix(NAMES.state_bucket)
    mappings = 0
    for i in range(0, plain + over, 10):
        entity = SigningKey.generate(Role.MODULE).public_key
        names = [f"app-{j:05d}" for j in range(i, min(i + 10, plain + over))]
        await js.publish(f"{state_prefix}{entity}", json.dumps(names).encode())
        mappings += 1
    present = (await stream_state(nc, stream, 10.0)).messages
    return {"written": written, "present": present, "secrets": plain + over, "mappings": mappings}


class Phases:
    """Splits the import's progress calls into its phases (each counts from 1 again)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if done < self._last or not self.marks:
            self.marks.append(time.perf_counter())
        self._last = done


async def measure(nc: NATS, entries: int, over: int) -> dict[str, Any]:
    key = XKey.generate()
    started = time.perf_counter()
    filled = await fill(nc, entries, over, key)
    fill_s = time.perf_counter() - started
    phases = Phases()
    started = time.perf_counter()
    report = await import_original(
        nc,
        backend_name=NAMES.name,
        layout=LAYOUT,
        encryption=key,
        admin_key=XKey.generate().public_key,
        progress=phases,
    )
    total_s = time.perf_counter() - started
    marks = [started, *phases.marks, started + total_s][:4]
    read_s, append_s, replace_s = (b - a for a, b in itertools.pairwise(marks))
    kv_head = (await stream_state(nc, kv_stream(NAMES.secrets_bucket), 10.0)).last_seq
    assert kv_head == report.secrets_revision, (kv_head, report.secrets_revision)
    assert report.versions == filled["present"], (report.versions, filled)
    present = filled["present"]
    return {
        "entries": present,
        "secrets": filled["secrets"],
        "mappings": filled["mappings"],
        "revisions": report.secrets_revision,
        "skipped_revisions": report.skipped,
        "fill": {"seconds": fill_s, "entries_per_s": filled["written"] / fill_s},
        "read_and_check": {"seconds": read_s, "entries_per_s": present / read_s},
        "append": {"seconds": append_s, "entries_per_s": present / append_s},
        "replace": {"seconds": replace_s, "entries_per_s": present / replace_s},
        "import": {"seconds": total_s, "entries_per_s": present / total_s},
        "budget_s": BUDGET_S,
        "fraction_of_budget": total_s / BUDGET_S,
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        ("fill the original's buckets (set-up)", "fill"),
        ("import: read and check", "read_and_check"),
        ("import: append to the event log", "append"),
        ("import: replace the buckets", "replace"),
        ("import, end to end", "import"),
    ]
    heading = (
        f"{results['entries']} entries, {results['secrets']} secrets, {results['mappings']} "
        f"mappings, {results['skipped_revisions']} revisions skipped"
    )
    budget = f"budget {results['budget_s']:.0f} s: used {results['fraction_of_budget']:.0%}"
    return rate_table(heading, rows, results, "entries", 40) + "\n" + budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_import", description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000, help="default 100000")
    parser.add_argument(
        "--over", type=int, default=50, help="secrets written past the history (default 50)"
    )
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "import.json"), metavar="FILE"
    )
    args = parser.parse_args(argv)
    if args.entries < 1 or args.over < 0:
        parser.error("--entries must be positive, --over not negative")
    results = run_on_a_fresh_server("bench-import", lambda nc: measure(nc, args.entries, args.over))
    report(results, table(results), Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
