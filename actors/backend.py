"""The supervisor behind `secrets-nats-kv run`: wires the actors together and owns them.

Start order follows the data: the event log and KV views exist, the KV writer runs, the
live view catches up with the log (the backend is ready only then), and the responder
pool starts taking requests. Stop order is the reverse: stop taking requests, finish
those in flight, then cancel the rest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from actors.access_log import AccessLog
from actors.decider import Decider
from actors.gate import AdminGate
from actors.health import Health
from actors.keyswitch import (
    SWAP_WAIT_S,
    SwapFollower,
    adopt_log_key,
    swap_under_way,
    wait_for_swap,
    wait_for_swap_end,
)
from actors.lifecycle import LifecycleActor
from actors.pool import Handler, ResponderPool
from actors.responder import GetResponder
from actors.service import (
    STATS_INCIDENTS,
    STATS_KEYS,
    STATS_PREVIOUS_TRANSIT,
    STATS_VIEW_SEQ,
    MicroService,
)
from actors.shredder import Shredder
from actors.store import StoreActor
from actors.transit import TransitKeys
from events.anchor import Anchor, Anchored, AnchorForged
from events.log import EventLog
from projections.foreign import (
    BucketFound,
    UnexplainedEntries,
    check_explained,
    check_layout,
    check_state_tail,
    check_tail,
    check_views,
    inspect_views,
)
from projections.kv import KvBuckets, KvLayout, KvWriter
from projections.live import FOREIGN_ENTRIES, LiveView
from projections.rebuild import refold_views
from projections.state import Effect
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendConfig
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.permissions import NatsRole, inbox_prefix

log = logging.getLogger(__name__)

REJECTED_ENTRIES = FOREIGN_ENTRIES  # the incident kind for entries on the log not ours
BUCKET_RECREATED = "bucket-recreated"  # a KV bucket was deleted under the backend
FORGED_API_ANSWERS = "forged-jetstream-answers"  # someone else answers $JS.API requests


def operation_handlers(
    responder: GetResponder, store: StoreActor, lifecycle: LifecycleActor
) -> dict[str, Handler]:
    """Which actor answers each operation on the backend's subject."""
    return {
        "server_xkey": responder.server_xkey,
        "get": responder.get,
        "put_secret": store.put_secret,
        "add_mapping": store.add_mapping,
        "remove_mapping": store.remove_mapping,
        "list": lifecycle.list,
        "mappings": lifecycle.mappings,
        "delete": lifecycle.delete,
        "undelete": lifecycle.undelete,
        "destroy": lifecycle.destroy,
    }


@dataclass
class Backend:
    """One backend instance. `run` blocks until `stop()`; readiness is `ready`."""

    config: BackendConfig
    drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        self._stop = anyio.Event()
        self.ready = anyio.Event()
        self.nc: NATS | None = None
        self.view: LiveView | None = None
        self.pool: ResponderPool | None = None
        self.transit: TransitKeys | None = None
        self.health = Health()
        self.writer: KvWriter | None = None
        self._shredder: Shredder | None = None
        # The one security core of this instance: its keyring (current and next key).
        self.barrier = Barrier(self.config.encryption_key, self.config.next_encryption_key)

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, object]:
        """What `secrets-nats-kv status` judges: view position, incidents, public keys."""
        return {
            STATS_VIEW_SEQ: self.view.applied_seq if self.view is not None else 0,
            STATS_INCIDENTS: self.health.snapshot(),
            STATS_KEYS: {
                "transit": self.config.transit_key.public_key,
                "encryption": self.barrier.public_key,
                "next_encryption": self.barrier.next_public_key,
                "admin": sorted(self.config.admin_public_keys),
                "previous_transit": [k.public_key for k in self.config.previous_transit_keys],
            },
            STATS_PREVIOUS_TRANSIT: [] if self.transit is None else self.transit.snapshot(),
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        names = config.names
        options = replace(config.nats, inbox_prefix=inbox_prefix(names, NatsRole.BACKEND))
        nc = self.nc = await connect(options, name=f"secrets-nats-kv {names.name}", persistent=True)
        barrier = self.barrier
        try:
            # A key rotation's swap under way: wait, never ready on half a log.
            await wait_for_swap(nc, names, barrier)
            await adopt_log_key(nc, names, barrier)
            event_log = EventLog(
                nc,
                backend_name=names.name,
                barrier=barrier,
                replicas=config.replicas,
            )
            views = KvBuckets(
                nc,
                KvLayout(
                    secrets_bucket=names.secrets_bucket,
                    state_bucket=names.state_bucket,
                    max_history=config.max_secret_history,
                    replicas=config.replicas,
                ),
            )
            # Before anything is created or changed: buckets only `import` may take over.
            # (A swap still under way may be rebuilding them: see `_check_buckets`.)
            swapping = await swap_under_way(nc, names)
            found = await inspect_views(nc, names.secrets_bucket, names.state_bucket)
            if not await event_log.exists():
                for bucket in found:
                    check_explained(bucket, 0)
            for bucket in found:
                check_layout(bucket)
            await event_log.ensure()
            anchor = Anchor(
                nc,
                backend_name=names.name,
                barrier=barrier,
                replicas=config.replicas,
                signer=config.audit_signing_key,  # each anchor a signed backend checkpoint
            )
            await anchor.ensure()
            anchored: Anchored | StorageError | None
            try:
                anchored = await anchor.read_past_strangers()
            except AnchorForged as exc:  # refuses the start, once the log has been judged
                anchored = exc

            async def refill(gone: list[str]) -> None:
                """Buckets deleted under a running backend: recreated, refilled from the log."""
                if view.paused or await swap_under_way(nc, names):
                    # A key rotation is rebuilding them: the writer retries its write.
                    raise StorageError("KV views", "being rebuilt by a key rotation")
                self.health.report(
                    BUCKET_RECREATED, f"{', '.join(gone)} vanished; recreated from the event log"
                )
                await views.ensure()
                await refold_views(nc, event_log, views, None)

            writer = self.writer = KvWriter(
                views, barrier=barrier, incidents=self.health, on_missing=refill
            )
            writer.prime(found[0].last_seq, found[1].last_seq)
            shredder = self._shredder = Shredder(event_log)

            def on_effects(seq: int, effects: list[Effect]) -> None:
                writer.submit(seq, effects)
                shredder.submit(seq, effects)

            health = self.health
            fences = SwapFollower(
                nc,
                names=names,
                barrier=barrier,
                writer=writer,
                health=health,
                replicas=config.replicas,
            )
            view = self.view = LiveView(
                event_log,
                on_effects=on_effects,
                report=lambda kind, detail, blocks: health.report(
                    kind, detail, blocks_writes=blocks
                ),
                anchored=anchored,
                on_forged_head=lambda detail: health.report(FORGED_API_ANSWERS, detail),
                fences=fences,
            )
            gate = AdminGate(
                config.transit_key,
                config.admin_public_keys,
                insecure=config.insecure_unauthenticated_admin,
            )
            access_log = None
            if config.access_log:
                access_log = AccessLog(
                    nc,
                    backend_name=names.name,
                    barrier=barrier,
                    replicas=config.replicas,
                    max_bytes=config.access_log_max_bytes,
                    max_age_days=config.access_log_max_age_days,
                )
                await access_log.ensure()
            transit = self.transit = TransitKeys(config.transit_key, config.previous_transit_keys)
            responder = GetResponder(
                view,
                transit=transit,
                barrier=barrier,
                trusted_issuers=frozenset(config.trusted_issuers),
                on_decision=access_log.record if access_log else None,
            )
            decider = Decider(
                event_log,
                view,
                (writer.applied, shredder.applied),
                health=health,
                anchor=anchor,
            )
            store = StoreActor(decider, gate, barrier=barrier, max_payload=nc.max_payload)
            lifecycle = LifecycleActor(decider, gate)
            handlers = operation_handlers(responder, store, lifecycle)
            pool = self.pool = ResponderPool(
                nc, names, handlers, concurrency=config.request_concurrency
            )
            service = MicroService(nc, names, pool, status=self.status)
            async with anyio.create_task_group() as tg:
                if access_log is not None:
                    await tg.start(access_log.run)
                # The view catches up first (its writes queue in the writer): the buckets
                # are checked against the log it read after them, before any is written.
                await tg.start(view.run)
                await self._check_buckets(nc, found, view, barrier, swapping=swapping)
                await views.ensure()
                await tg.start(writer.run)
                await tg.start(shredder.run)
                await tg.start(pool.run)
                await service.start(sorted(handlers))
                self.ready.set()
                log.info(
                    "backend ready",
                    extra={"subject": names.subject_prefix, "events": view.applied_seq},
                )
                task_status.started()
                await self._stop.wait()
                with anyio.move_on_after(self.drain_timeout, shield=True):
                    await service.stop()  # no new requests
                    await pool.close()  # answer those already taken
                    await pool.finished.wait()
                tg.cancel_scope.cancel()
        finally:
            for queue in (self.writer, self._shredder):
                if queue is not None:
                    queue.close()  # its queue, if it never ran (a refused start)
            # NATS may be gone by now: closing a dead connection is not a failure of ours.
            with anyio.move_on_after(5, shield=True), contextlib.suppress(OSError):
                await nc.close()

    async def _check_buckets(
        self,
        nc: NATS,
        found: list[BucketFound],
        view: LiveView,
        barrier: Barrier,
        *,
        swapping: bool,
    ) -> None:
        """Refuse to start on buckets the log does not explain (projections/foreign.py).

        Only a log this process could read whole explains anything: entries it rejected
        (a wrong key, forgeries) wrote nothing it can count, so the comparison is left to
        the writer's own checks then, with a warning.

        A backend may start once a swapped log is whole (`wait_for_swap`), while the
        rotation still drops and rebuilds the KV views: the buckets it read may be the
        old ones (sealed and tagged under the old key) or a rebuild's. If they are refused
        while a committed swap was or is under way (`swapping`: looked up before they were
        read), the verdict waits for the swap's end (staging is dropped only after the
        rebuilt views were checked), then the buckets are read again and judged against
        the log folded after that read, the same rule as the first look: a foreign write
        the rebuild did not drop is in them then, and refuses; one it dropped is gone.
        """
        refused = await self._refused(nc, found, view, barrier)
        if refused is None:
            return
        names = self.config.names
        if not (swapping or await swap_under_way(nc, names)):
            raise refused
        log.info("a key rotation is rebuilding the KV views: checking them once it is done")
        await wait_for_swap_end(nc, names)
        found = await inspect_views(nc, names.secrets_bucket, names.state_bucket)
        for bucket in found:
            check_layout(bucket)
        await view.wait_fresh(SWAP_WAIT_S)  # a fold of the log read after the buckets
        refused = await self._refused(nc, found, view, barrier)
        if refused is not None:
            raise refused

    async def _refused(
        self, nc: NATS, found: list[BucketFound], view: LiveView, barrier: Barrier
    ) -> UnexplainedEntries | None:
        """Why `found` is not explained by the view's fold, or None if it is."""
        if view.state.rejected:
            log.warning(
                "event log entries rejected: the buckets are not checked against the log",
                extra={"rejected": view.state.rejected},
            )
            return None
        try:
            check_views(found[0], found[1], view.state)
            await check_tail(nc, found[0], view.state, barrier)  # ours (KV tag) and the log's
            await check_state_tail(nc, found[1], view.state, barrier)
        except UnexplainedEntries as exc:
            return exc
        return None
