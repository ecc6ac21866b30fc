"""`python -m bench.bench_replay [--events N]`: how fast the whole log is replayed.

Two offline commands read the entire event log: `rebuild` (fold it into the KV views)
and `rotate-key` (re-seal, re-tag and copy it twice, then rebuild). Both must cope with
logs of 100 000 events. This starts its own nats-server, writes N events straight to
the log (pipelined, tagged exactly as the backend's appender tags them; about 1% of the
puts are erased afterwards, as `destroy` leaves them), then measures, in events/second:

- filling the log (set-up, for reference);
- reading it: batched direct gets (what rotation uses) and nats-py's ordered consumer
  (what `EventLog.entries` uses);
- `rebuild_views` (drop and refold both KV views);
- `rotate_key` end to end, and its three passes (stage, copy back, rebuild).

It prints a table and writes `bench/results/replay.json` (`--output` to change).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from actors.rotation import rotate_key
from bench.single_server import rate_table, report, run_on_a_fresh_server
from events.log import EventLog, stream_name, subject_prefix
from events.types import (
    Event,
    KeyRotated,
    MappingAdded,
    SecretDeleted,
    SecretDestroyed,
    SecretPut,
    decode_event,
)
from projections.kv import KvLayout
from projections.rebuild import rebuild_views
from secrets_nats_kv.barrier import GENESIS, Barrier, digest
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nats.jetstream import erase_message, stream_state
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import get_message, read_stream, read_stream_ordered
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.xkeys import SealBox, XKey

NAMES = BackendNames()
LAYOUT = KvLayout(secrets_bucket=NAMES.secrets_bucket, state_bucket=NAMES.state_bucket)
SECRETS = 1_000  # about 100 writes per key at 100k events: past the 64 of history
ENTITIES = 200
ERASE_EVERY = 97  # one put in 97 is erased afterwards (a gap, as destroy leaves)


def event_at(i: int, box: SealBox, entities: list[str]) -> Event:
    """The i-th event of the synthetic log: mostly puts, some mappings and deletes."""
    name = f"app-{i % SECRETS:05d}"
    if i % 50 == 7:
        entity = entities[i % len(entities)]
        return MappingAdded(at=time.time(), entity=entity, secrets=(name,))
    if i % 211 == 13:
        return SecretDeleted(at=time.time(), name=name)
    return SecretPut(at=time.time(), name=name, sealed=box.seal(b"value %d " % i + os.urandom(16)))


async def fill(nc: NATS, count: int, key: XKey) -> tuple[float, int]:
    """Write `count` events to a fresh log; erase some puts. Returns (seconds, gaps)."""
    log = EventLog(nc, backend_name=NAMES.name, barrier=Barrier(key))
    await log.ensure()
    box = SealBox(key, key)
    entities = [SigningKey.generate(Role.MODULE).public_key for _ in range(ENTITIES)]
    erase: dict[int, str] = {}  # seq -> digest of its bytes, for the destroy that names them
    started = time.perf_counter()
    previous = GENESIS
    async with PositionedPublisher(nc, log.stream, log.prefix) as publisher:
        for seq in range(1, count + 1):
            event = event_at(seq, box, entities)
            encoded = log.encode(event, seq, previous)
            previous = encoded.link
            await publisher.publish(seq, log.subject_for(event), encoded.body, encoded.headers)
            if isinstance(event, SecretPut) and seq % ERASE_EVERY == 0:
                erase[seq] = digest(encoded.body)
        # The erasures are a destroy's, as in a real log: the chain names what they were.
        destroyed = SecretDestroyed(
            at=time.time(),
            name="bench-erasures",
            erased_seqs=tuple(erase),
            erased_digests=tuple(erase.values()),
        )
        encoded = log.encode(destroyed, count + 1, previous)
        await publisher.publish(
            count + 1, log.subject_for(destroyed), encoded.body, encoded.headers
        )
        await publisher.drain()
    for seq in erase:
        await erase_message(nc, log.stream, seq, 5.0)
    return time.perf_counter() - started, len(erase)


async def timed_read(read: Callable[[], Any]) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    async for _ in read():
        count += 1
    return time.perf_counter() - started, count


class Passes:
    """Progress callback that timestamps the end of each pass over the log."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ends: list[float] = []

    def __call__(self, done: int, total: int) -> None:
        if done >= total:
            self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        marks = [self.started, *self.ends]
        return [b - a for a, b in itertools.pairwise(marks)]


async def measure(nc: NATS, count: int) -> dict[str, Any]:
    old, new = XKey.generate(), XKey.generate()
    fill_s, gaps = await fill(nc, count, old)
    live = stream_name(NAMES.name)
    head = (await stream_state(nc, live, 5.0)).last_seq
    direct_s, direct_n = await timed_read(
        lambda: read_stream(nc, live, f"{subject_prefix(NAMES.name)}.>")
    )
    ordered_s, ordered_n = await timed_read(
        lambda: read_stream_ordered(nc, live, f"{subject_prefix(NAMES.name)}.>")
    )
    started = time.perf_counter()
    rebuilt = await rebuild_views(
        nc,
        backend_name=NAMES.name,
        layout=LAYOUT,
        barrier=Barrier(old),
    )
    rebuild_s = time.perf_counter() - started
    passes = Passes()
    report = await rotate_key(
        nc,
        names=NAMES,
        layout=LAYOUT,
        old=old,
        new=new,
        force=False,
        dry_run=False,
        progress=passes,
    )
    rotate_s = time.perf_counter() - passes.started
    # Sanity: the rotated log ends with the rotation and the views were refolded.
    last = await get_message(nc, live, head + 1)
    assert last is not None
    assert isinstance(decode_event(last.data), KeyRotated)
    kv_head = (await stream_state(nc, kv_stream(NAMES.secrets_bucket), 5.0)).last_seq
    assert kv_head == rebuilt.secrets_revision, (kv_head, rebuilt.secrets_revision)
    stage_s, copy_s, refold_s = ([*passes.durations(), 0.0, 0.0, 0.0])[:3]
    entries = head + 1
    return {
        "events": count,
        "log_entries": head,
        "erased_entries": gaps,
        "resealed_values": report.resealed,
        "fill": {"seconds": fill_s, "events_per_s": count / fill_s},
        "read_batched_direct_get": {"seconds": direct_s, "events_per_s": direct_n / direct_s},
        "read_ordered_consumer": {"seconds": ordered_s, "events_per_s": ordered_n / ordered_s},
        "rebuild": {"seconds": rebuild_s, "events_per_s": head / rebuild_s},
        "rotate_key": {"seconds": rotate_s, "events_per_s": entries / rotate_s},
        "rotate_key_stage": {"seconds": stage_s, "events_per_s": entries / stage_s},
        "rotate_key_copy_back": {"seconds": copy_s, "events_per_s": entries / copy_s},
        "rotate_key_rebuild": {"seconds": refold_s, "events_per_s": entries / refold_s},
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        ("fill (set-up, pipelined appends)", "fill"),
        ("read: batched direct get", "read_batched_direct_get"),
        ("read: ordered consumer", "read_ordered_consumer"),
        ("rebuild (refold both KV views)", "rebuild"),
        ("rotate-key, end to end", "rotate_key"),
        ("  pass 1: stage (re-seal, re-tag)", "rotate_key_stage"),
        ("  pass 2: copy back to the live log", "rotate_key_copy_back"),
        ("  pass 3: rebuild the KV views", "rotate_key_rebuild"),
    ]
    heading = (
        f"{results['events']} events ({results['erased_entries']} erased, "
        f"{results['resealed_values']} values re-sealed)"
    )
    return rate_table(heading, rows, results, "events", 38)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_replay", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="log size (default 100000)")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "replay.json"), metavar="FILE"
    )
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be positive")
    results = run_on_a_fresh_server("bench-replay", lambda nc: measure(nc, args.events))
    report(results, table(results), Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
