"""`rotate-key`: re-seal every value and re-tag every event for a new encryption key.

The encryption key seals values at rest *and* keys the position-bound tag of every event,
so a rotation rewrites the whole log: each `SecretPut.sealed` is opened with the old key
and sealed again with the new one, and every event is tagged again for the new key at the
same position. Positions are kept exactly (an erased entry stays a gap at its sequence),
so every secret keeps its version numbers. A final `KeyRotated` closes the log, and both
KV views are folded again from it.

Crash safety. A stream cannot be rewritten in place, so the work goes through a staging
stream, `SECRETS_{name}_events_rotating` (subjects `wasmcloud_secrets_rotating.{name}.>`,
so it never overlaps the live log), in two phases:

1. Stage: copy the live log into the staging stream, re-sealed and re-tagged, gaps
   reproduced (a filler published at the position, then erased), ending with the
   `KeyRotated` event. That event is the marker: staging is complete iff its last entry
   is a `KeyRotated` to the new key, tagged for the new key at its position. The live log
   and KV views are untouched: a crash here leaves the old state complete, served with
   the old key; a re-run discards an incomplete staging stream and starts over.
2. Commit, then swap: the staging stream's metadata is switched to `committed` (one
   atomic stream update) *before* the live log is touched. From then on the staging
   stream is the only source of truth and is never discarded: the live log is deleted,
   recreated (`EventLog.ensure`), filled from staging (gaps again as erased fillers,
   the `KeyRotated` last, so its presence at its position proves the copy complete), the
   KV views are rebuilt with `rebuild_views` and checked against a fold of the staged log
   done here, and only then is the staging stream deleted (a rebuild that disagrees fails
   the run and keeps staging, so a re-run rebuilds again).
   A crash anywhere in phase 2 is finished by re-running: a committed staging stream is
   resumed with the NEW key alone (the old key is not needed any more, so the re-run may
   give the old key, or the new one, as ENCRYPTION_XKEY_SEED). A committed staging stream
   for another new key is refused, not deleted.

A complete but uncommitted staging stream is reused if the live log has not moved since
(its head is just before the staged `KeyRotated`); otherwise it is stale and redone. A
committed one whose live log has grown past it (a backend wrote after the commit) is
refused with a message, never overwritten. Entries the old key does not authenticate
(forgeries) stay rejected: an empty, untagged placeholder keeps their position. Copies
carry no `Nats-Msg-Id`, so the duplicate window starts empty after a rotation.

One run at a time: a run takes `RotationLock` (`lock`) before touching any stream, and a
second run started meanwhile is refused with a message.

Writes are pipelined (`PositionedPublisher`: a window of publishes in flight, each pinned
with `Nats-Expected-Last-Sequence`), reads are batched direct gets
(`secrets_nats_kv.nats.reader.read_stream`).

Online (`rotate-key --online`, `online`): the same staging and swap with backends
running, which hold the new key as their next one (`precheck`). The copy catches up with
the writes made meanwhile (`catchup`), then a write fence in the live log (`fence`)
stops writes for the refill of the live log; the swap writes the marker after the
refill and the anchor, so backends switch to the new log once it is whole, and rebuilds
the KV views after it, with writes going on. `--abort` before the commit
lifts the fence and drops staging.

Rooms: `plan` (the entry point: what to do), `copy` (phase 1 and the copy loop),
`reseal` (one entry converted), `swap` (phase 2), `verify` (the rebuilt views against
the staged log), `lock`, `online`, `catchup`, `fence`, `precheck`, `crashpoints` (where
a test may stop a run: tests inject the stopping, the product never stops).
"""

from actors.crashpoints import NO_CRASHES, CrashPoints
from actors.rotation.context import STATE_KEY, staging_stream_name
from actors.rotation.plan import abort_rotation, rotate_key
from actors.rotation.precheck import BackendKeys
from actors.rotation.report import RotationRefused, RotationReport

__all__ = [
    "NO_CRASHES",
    "STATE_KEY",
    "BackendKeys",
    "CrashPoints",
    "RotationRefused",
    "RotationReport",
    "abort_rotation",
    "rotate_key",
    "staging_stream_name",
]
