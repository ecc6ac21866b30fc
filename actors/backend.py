"""The supervisor behind `secrets-nats-kv run`: wires the actors together and owns them.

Start order follows the data: the event log and KV views exist, the KV writer runs, the
live view catches up with the log (the backend is ready only then), and the responder
pool starts taking requests. Stop order is the reverse: stop taking requests, finish
those in flight, then cancel the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from actors.access_log import AccessLog
from actors.decider import Decider
from actors.gate import AdminGate
from actors.health import Health
from actors.lifecycle import LifecycleActor
from actors.pool import Handler, ResponderPool
from actors.responder import GetResponder
from actors.service import MicroService
from actors.shredder import Shredder
from actors.store import StoreActor
from events.anchor import Anchor, Anchored, AnchorForged
from events.log import EventLog
from projections.kv import KvBuckets, KvLayout, KvWriter
from projections.live import LiveView
from projections.state import Effect
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendConfig
from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.connection import connect

log = logging.getLogger(__name__)


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
        self.health = Health()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        names = config.names
        nc = self.nc = await connect(
            config.nats, name=f"secrets-nats-kv {names.name}", persistent=True
        )
        barrier = Barrier(config.encryption_key)  # the one security core of this instance
        try:
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
            await event_log.ensure()
            await views.ensure()
            anchor = Anchor(nc, backend_name=names.name, barrier=barrier, replicas=config.replicas)
            await anchor.ensure()
            anchored: Anchored | StorageError | None
            try:
                anchored = await anchor.read()
            except AnchorForged as exc:  # refuses the start, once the log has been judged
                anchored = exc
            writer = KvWriter(
                views,
                barrier=barrier,
                report=lambda kind, detail, blocks: self.health.report(
                    kind, detail, blocks_writes=blocks
                ),
            )
            await writer.prepare()
            await _refuse_an_emptied_log(event_log, writer)
            shredder = Shredder(event_log)

            def on_effects(seq: int, effects: list[Effect]) -> None:
                writer.submit(seq, effects)
                shredder.submit(seq, effects)

            health = self.health
            view = self.view = LiveView(
                event_log,
                on_effects=on_effects,
                report=lambda kind, detail, blocks: health.report(
                    kind, detail, blocks_writes=blocks
                ),
                anchored=anchored,
            )
            gate = AdminGate(
                config.transit_key,
                config.admin_public_keys,
                insecure=config.insecure_unauthenticated_admin,
            )
            access_log = None
            if config.access_log:
                access_log = AccessLog(
                    nc, backend_name=names.name, barrier=barrier, replicas=config.replicas
                )
                await access_log.ensure()
            responder = GetResponder(
                view,
                transit=config.transit_key,
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
            store = StoreActor(decider, gate, barrier=barrier)
            lifecycle = LifecycleActor(decider, gate)
            handlers = operation_handlers(responder, store, lifecycle)
            pool = self.pool = ResponderPool(
                nc, names, handlers, concurrency=config.request_concurrency
            )
            service = MicroService(nc, names, pool)
            async with anyio.create_task_group() as tg:
                if access_log is not None:
                    await tg.start(access_log.run)
                await tg.start(writer.run)
                await tg.start(shredder.run)
                await tg.start(view.run)
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
            with anyio.move_on_after(5, shield=True):
                await nc.close()


async def _refuse_an_emptied_log(event_log: EventLog, writer: KvWriter) -> None:
    """An empty log under views that hold revisions was deleted (or replaced): refuse,
    rather than start over at version 1 and hand out versions the views still hold."""
    if await event_log.head() == 0 and writer.written:
        raise StorageError(
            "event log",
            f"{event_log.stream} is empty but the KV views hold revisions: the log was "
            "deleted or replaced; restore it (or drop both buckets to start afresh)",
        )
