"""`import`: record everything the original secrets-nats-kv left in the event log, then
replace its buckets with the project's own, folded from that log with every revision kept.

Phases, each safe to be killed in:

1. Read and check (nothing written). Both original buckets are read to their heads;
   every value must open with the encryption key (so a wrong key writes nothing), and
   its plaintext decides string or binary, then is dropped. `projections.import_plan`
   turns what was read into events; `--dry-run` stops here.
2. Append. The log gets an `OriginalImported` record at sequence 1 (how many entries
   follow, their digest, the counts), then the planned events, pipelined, each pinned
   to its position. Until the last lands the original's buckets are untouched and stay
   the source of truth: a re-run whose plan has the same digest resumes after the log's
   head; one whose plan differs (an old instance wrote meanwhile) deletes the
   incomplete log, which only an import ever wrote, and starts over.
3. Replace. Only once the log holds every entry: the buckets' heads are checked against
   the record (a moved bucket means an old instance wrote after the read: the log is
   redone from a new read, never the bucket dropped), the original's streams are
   deleted (their `deny_delete` cannot be lifted in place), the project's are created
   carrying the metadata marker `replacing` (`run` and `rebuild` refuse such a bucket),
   folded from the log with pinned revisions (`projections.rebuild.refold_views`),
   checked, and marked `done`. A crash in this phase is finished by a re-run, which
   drops and refolds them again: every acknowledged value is in the log by then, so no
   value ever exists only in memory.

A log already holding the whole import and views marked done: nothing to do. A log with
events that no import wrote: refused (import only into a backend that never ran).

Crash points (`actors.crashpoints`, injected by tests): `append` per entry sent,
`appended`, `dropped`, `refold` per entry folded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from actors.crashpoints import NO_CRASHES, CrashPoints
from actors.takeover.reader import BucketRead, read_bucket
from actors.takeover.report import ImportReport
from events.log import EventLog
from events.types import OriginalImported, Rejected, SecretKind
from projections.foreign import (
    IMPORT_DONE,
    IMPORT_MARKER,
    IMPORT_REPLACING,
    BucketFound,
    inspect_views,
)
from projections.import_plan import (
    OPERATION_DELETE,
    OPERATION_PURGE,
    ImportPlan,
    ImportRefused,
    SecretEntry,
    StateEntry,
    plan_import,
)
from projections.kv import KvBuckets, KvLayout
from projections.rebuild import refold_views
from secrets_nats_kv.barrier import GENESIS, Barrier
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.nats.jetstream import to_backend_error
from secrets_nats_kv.nats.positioned import PositionConflict
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.xkeys import SealBox, XKey

_API_TIMEOUT = 10.0
_RESUME_ATTEMPTS = 5


async def import_original(
    nc: NATS,
    *,
    backend_name: str,
    layout: KvLayout,
    encryption: XKey,
    admin_key: str,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    crash: CrashPoints = NO_CRASHES,
) -> ImportReport:
    """Take over the original's buckets (see the module docstring); one line of report."""
    importer = _Importer(nc, backend_name, layout, encryption, admin_key, progress, crash)
    return await importer.run(dry_run=dry_run)


class _Importer:
    def __init__(
        self,
        nc: NATS,
        backend_name: str,
        layout: KvLayout,
        encryption: XKey,
        admin_key: str,
        progress: Callable[[int, int], None] | None,
        crash: CrashPoints,
    ) -> None:
        self.nc = nc
        self.crash = crash
        self.layout = layout
        self.encryption = encryption
        self.admin_key = admin_key
        self.progress = progress
        self.log = EventLog(
            nc,
            backend_name=backend_name,
            barrier=Barrier(encryption),
            replicas=layout.replicas,
        )
        self.views = KvBuckets(nc, layout)

    async def run(self, *, dry_run: bool) -> ImportReport:
        head = await self.log.head() if await self.log.exists() else 0
        record = await self._record() if head else None
        if record is not None and head >= 1 + record.entries:
            return await self._after_complete_log(record, head, dry_run)
        plan = await self._plan()
        if dry_run:
            return ImportReport.of("dry run", plan)
        if record is not None and plan.matches(record):
            await self._resume(plan, record)
            await self._replace(record)
            return ImportReport.of("resumed", plan)
        if head:
            await self._discard_log()  # an incomplete import of buckets that changed since
        record = plan.record(at=time.time(), admin_key=self.admin_key)
        await self._append(plan, record, from_seq=1, previous=GENESIS)
        await self._replace(record)
        return ImportReport.of("imported", plan)

    async def _after_complete_log(
        self, record: OriginalImported, head: int, dry_run: bool
    ) -> ImportReport:
        found = await self._found()
        done = all(_marked(f, IMPORT_DONE) for f in found)
        if head > 1 + record.entries or done:
            return ImportReport.of_record("already imported", record)
        if self._moved(found, record):
            # Swap not begun and an old instance wrote after the read: read again.
            if dry_run:
                return ImportReport.of("dry run", await self._plan())
            await self._discard_log()
            return await self.run(dry_run=False)
        if dry_run:
            return ImportReport.of_record("dry run", record)
        await self._replace(record)
        return ImportReport.of_record("finished", record)

    # --- reading ------------------------------------------------------------------------

    async def _record(self) -> OriginalImported:
        """The log's first entry, which must be an import's record."""
        entry = await self.log.entry(1)
        first = entry.event if entry is not None else None
        if isinstance(first, OriginalImported):
            return first
        head = await self.log.head()
        if isinstance(first, Rejected):
            raise ImportRefused(
                f"the event log {self.log.stream} does not verify with this "
                f"ENCRYPTION_XKEY_SEED ({self.encryption.public_key}): wrong key?"
            )
        raise ImportRefused(
            f"the event log {self.log.stream} already holds {head} events that no import "
            "wrote: import only into a backend that never ran (or choose another --name)"
        )

    async def _plan(self) -> ImportPlan:
        found = await self._found()
        secrets_found = found[0]
        if not secrets_found.exists:
            raise ImportRefused(f"nothing to import: there is no {secrets_found.stream}")
        for bucket in found:
            # A bucket an import was still folding holds only part of the log, which is
            # gone: importing it would lose the rest. (One marked done is whole: a new
            # import of it is how to come back after a rollback to the original.)
            if _marked(bucket, IMPORT_REPLACING):
                raise ImportRefused(
                    f"{bucket.stream} is half rebuilt by an import whose event log is gone: "
                    "restore the log and run import again"
                )
        secrets = await read_bucket(self.nc, self.layout.secrets_bucket)
        state = await read_bucket(self.nc, self.layout.state_bucket)
        return plan_import(
            secrets_bucket=self.layout.secrets_bucket,
            state_bucket=self.layout.state_bucket,
            secrets=self._open_all(secrets),
            secrets_revision=secrets.last_revision,
            state=[
                StateEntry(m.revision, m.key, m.at, _operation(m.operation, m.revision), m.data)
                for m in state.messages
            ],
            state_revision=state.last_revision,
        )

    def _open_all(self, read: BucketRead) -> list[SecretEntry]:
        """Every value checked to open with the encryption key; kinds from the plaintext."""
        box = SealBox(self.encryption, self.encryption)
        entries = []
        for m in read.messages:
            operation = _operation(m.operation, m.revision)
            if operation is not None:
                entries.append(SecretEntry(m.revision, m.key, m.at, operation))
                continue
            try:
                plaintext = box.open(m.data)
            except DecryptionError:
                raise ImportRefused(
                    f"{kv_stream(read.bucket)} revision {m.revision} ({m.key}) does not open "
                    f"with ENCRYPTION_XKEY_SEED ({self.encryption.public_key}): wrong key? "
                    "nothing was written"
                ) from None
            kind = _kind(plaintext)
            size = len(plaintext)
            del plaintext
            entries.append(SecretEntry(m.revision, m.key, m.at, None, m.data, kind, size))
        return entries

    async def _found(self) -> list[BucketFound]:
        return await inspect_views(self.nc, self.layout.secrets_bucket, self.layout.state_bucket)

    @staticmethod
    def _moved(found: list[BucketFound], record: OriginalImported) -> bool:
        """Whether a bucket not yet replaced was written after the import read it."""
        expected = (record.secrets_revision, record.state_revision)
        return any(
            f.exists and f.marker is None and f.last_seq != last
            for f, last in zip(found, expected, strict=True)
        )

    # --- writing ------------------------------------------------------------------------

    async def _append(
        self, plan: ImportPlan, record: OriginalImported, *, from_seq: int, previous: str
    ) -> None:
        """Append the plan's entries from `from_seq` on, chained after the link `previous`
        (of the entry at `from_seq - 1`): the log a backend verifies and serves."""
        await self.log.ensure()
        planned = [record, *plan.events]
        total = len(planned)

        async def sent(seq: int) -> None:
            if self.crash.reached("append"):
                await self.log.flush()
                self.crash.stop()
            if self.progress is not None:
                self.progress(seq, total)

        await self.log.append_pipelined(
            planned[from_seq - 1 :], first_seq=from_seq, previous=previous, on_sent=sent
        )
        if self.crash.reached("appended"):
            self.crash.stop()

    async def _resume(self, plan: ImportPlan, record: OriginalImported) -> None:
        """Append the rest of `plan` after the log's head.

        A killed run's last publishes may still land after this run read the head (the
        server reads what the dead connection sent on its own time). They are entries of
        this same plan at their own pinned positions, so a taken position means: read
        the head again and go on from there.
        """
        for _ in range(_RESUME_ATTEMPTS):
            # The chain goes on from the link of the last entry there (verified on the way).
            head, link = await self.log.tail()
            try:
                await self._append(plan, record, from_seq=head + 1, previous=link)
                return
            except PositionConflict:
                continue
        raise ImportRefused(
            f"{self.log.stream} kept moving while resuming: is another import running?"
        )

    async def _discard_log(self) -> None:
        try:
            await self.nc.jetstream(timeout=_API_TIMEOUT).delete_stream(self.log.stream)
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.Error as exc:
            raise to_backend_error(f"delete {self.log.stream}", exc) from None

    async def _replace(self, record: OriginalImported) -> None:
        """Drop the buckets, make the project's own, fold them from the log, mark them done."""
        found = await self._found()
        if self._moved(found, record):
            raise ImportRefused(
                f"the original's buckets changed while importing ({found[0].stream} at "
                f"{found[0].last_seq}, read at {record.secrets_revision}): an old "
                "secrets-nats-kv is still running; stop it and run import again"
            )
        await self.views.drop()
        if self.crash.reached("dropped"):
            self.crash.stop()
        await self.views.ensure(metadata={IMPORT_MARKER: IMPORT_REPLACING})

        def folded(done: int, total: int) -> None:
            if self.crash.reached("refold"):
                self.crash.stop()
            if self.progress is not None:
                self.progress(done, total)

        state = await refold_views(self.nc, self.log, self.views, folded)
        secrets_last = await self.views.last_revision(self.layout.secrets_bucket)
        state_last = await self.views.last_revision(self.layout.state_bucket)
        if (secrets_last, state_last) != (state.secrets_revision, state.state_revision):
            raise ImportRefused(
                f"the refolded buckets end at revisions {secrets_last}/{state_last}, the log "
                f"implies {state.secrets_revision}/{state.state_revision}: run import again"
            )
        for bucket in (self.layout.secrets_bucket, self.layout.state_bucket):
            await self._mark(bucket, IMPORT_DONE)

    async def _mark(self, bucket: str, value: str) -> None:
        js = self.nc.jetstream(timeout=_API_TIMEOUT)
        try:
            info = await js.stream_info(kv_stream(bucket))
            info.config.metadata = {**(info.config.metadata or {}), IMPORT_MARKER: value}
            await js.update_stream(info.config)
        except nats.errors.Error as exc:
            raise to_backend_error(f"mark {kv_stream(bucket)}", exc) from None


def _marked(found: BucketFound, value: str) -> bool:
    return found.marker == value


def _operation(header: str | None, revision: int) -> str | None:
    """A KV message's operation: None for a value, else DEL or PURGE."""
    if header is None or header == "PUT":
        return None
    if header in (OPERATION_DELETE, OPERATION_PURGE):
        return header
    raise ImportRefused(f"revision {revision} has an unknown KV-Operation {header!r}")


def _kind(plaintext: bytes) -> SecretKind:
    """What the original served it as, minus its bug: UTF-8 text is a string secret."""
    try:
        plaintext.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "string"
