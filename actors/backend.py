"""The supervisor behind `secrets-nats-kv run`: wires the actors together and owns them.

Start order follows the data: the event log and KV views exist, the KV writer runs, the
live view catches up with the log (the backend is ready only then), and the responder
pool starts taking requests. Stop order is the reverse: stop taking requests, finish
those in flight, then cancel the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from actors.access_log import AccessLog
from actors.admin import AdminGate
from actors.appender import Appender
from actors.commands import CommandActor
from actors.health import Health
from actors.lifecycle import LifecycleActor
from actors.pool import Handler, ResponderPool
from actors.responder import GetResponder
from actors.service import MicroService
from events.integrity import EventAuthenticator
from events.log import EventLog
from projections.kv import KvLayout, KvViews, KvWriter
from projections.live import LiveView
from projections.rebuild import refold_views
from secrets_nats_kv.config import BackendConfig
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.permissions import NatsRole, inbox_prefix

log = logging.getLogger(__name__)

REJECTED_ENTRIES = "rejected-entries"  # the incident kind for entries on the log not ours
BUCKET_RECREATED = "bucket-recreated"  # a KV bucket was deleted under the backend
FORGED_API_ANSWERS = "forged-jetstream-answers"  # someone else answers $JS.API requests


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

    def _rejected_entry(self, seq: int, reason: str) -> None:
        """An entry on the log that is not ours: one incident, counted, logged once."""
        self.health.report(REJECTED_ENTRIES, f"latest at #{seq}: {reason}")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        names = config.names
        options = replace(config.nats, inbox_prefix=inbox_prefix(names, NatsRole.BACKEND))
        nc = self.nc = await connect(options, name=f"secrets-nats-kv {names.name}", persistent=True)
        try:
            event_log = EventLog(
                nc,
                backend_name=names.name,
                authenticator=EventAuthenticator.for_key(config.encryption_key),
                replicas=config.replicas,
            )
            views = KvViews(
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

            async def refill(gone: list[str]) -> None:
                """Buckets deleted under a running backend: recreated, refilled from the log."""
                self.health.report(
                    BUCKET_RECREATED, f"{', '.join(gone)} vanished; recreated from the event log"
                )
                await views.ensure()
                await refold_views(nc, event_log, views, None)

            writer = KvWriter(views, event_log, on_missing=refill)
            await writer.prepare()
            view = self.view = LiveView(
                event_log,
                on_effects=writer.submit,
                on_rejected=self._rejected_entry,
                on_forged_head=lambda detail: self.health.report(FORGED_API_ANSWERS, detail),
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
                    replicas=config.replicas,
                    max_bytes=config.access_log_max_bytes,
                    max_age_days=config.access_log_max_age_days,
                )
                await access_log.ensure()
            responder = GetResponder(
                view,
                transit=config.transit_key,
                encryption=config.encryption_key,
                trusted_issuers=frozenset(config.trusted_issuers),
                on_decision=access_log.record if access_log else None,
            )
            appender = Appender(event_log, view, writer)
            commands = CommandActor(
                appender, gate, encryption=config.encryption_key, max_payload=nc.max_payload
            )
            lifecycle = LifecycleActor(appender, gate)
            handlers: dict[str, Handler] = {
                "server_xkey": responder.server_xkey,
                "get": responder.get,
                "put_secret": commands.put_secret,
                "add_mapping": commands.add_mapping,
                "remove_mapping": commands.remove_mapping,
                "list": lifecycle.list,
                "mappings": lifecycle.mappings,
                "delete": lifecycle.delete,
                "undelete": lifecycle.undelete,
                "destroy": lifecycle.destroy,
            }
            pool = self.pool = ResponderPool(
                nc, names, handlers, workers=config.request_concurrency
            )
            service = MicroService(nc, names, pool)
            async with anyio.create_task_group() as tg:
                if access_log is not None:
                    await tg.start(access_log.run)
                await tg.start(writer.run)
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
