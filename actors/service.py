"""The backend as a NATS micro service: discovery and stats in NATS's own conventions.

`$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (for `nats micro ls/info/stats`) find every
instance. The service's one endpoint *is* the protocol's queue subscription
(`{prefix}.>` in `{queue_base}.{name}`); it hands each request to the responder pool, and
the pool's per-operation counters are the endpoint's stats data. An instance registers
only once its view has caught up, so answering PING means ready.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointStats, Service

from actors.pool import ResponderPool
from secrets_nats_kv import __version__
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nats.connection import round_trip

SERVICE_NAME = "secrets-nats-kv"
# What an instance adds to its endpoint's stats data, for `secrets-nats-kv status`.
STATS_VIEW_SEQ = "view_seq"  # the last log sequence its view has applied
STATS_INCIDENTS = "incidents"  # Health.snapshot()
# {"transit": X…, "encryption": X…, "next_encryption": X… | None, "admin": [X…]}: never a seed
STATS_KEYS = "public_keys"
STATS_PREVIOUS_TRANSIT = "previous_transit_keys"  # TransitKeys.snapshot(): last use, hosts


class MicroService:
    """Owns the micro service registration of one backend instance."""

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        pool: ResponderPool,
        status: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self._nc = nc
        self._names = names
        self._pool = pool
        self._status = status
        self._service: Service | None = None

    async def start(self, operations: list[str]) -> None:
        self._service = await add_service(
            self._nc,
            name=SERVICE_NAME,
            version=__version__,
            description="wasmCloud secrets backend (NATS KV layout, event-sourced)",
            metadata={
                "backend": self._names.name,
                "subject": self._names.subject_prefix,
            },
            stats_handler=self._stats_data,
        )
        await self._service.add_endpoint(
            name="secrets",
            subject=f"{self._names.subject_prefix}.>",
            queue_group=self._names.queue_group,
            handler=self._handle,
            metadata={"operations": ",".join(operations)},
        )
        # Started means ready: the server has the endpoint's SUB, so a request from any
        # other connection finds a responder (no "no responders" right after start).
        await round_trip(self._nc)

    async def _handle(self, request: MicroRequest) -> None:
        await self._pool.submit(request._msg)  # the raw message: the pool answers it itself

    def _stats_data(self, _: EndpointStats) -> dict[str, object]:
        data = self._pool.stats.as_dict()
        if self._status is not None:
            data.update(self._status())
        return data

    async def stop(self) -> None:
        """Stop taking requests and leave discovery, answering every request already routed here.

        nats.micro's own stop unsubscribes, dropping requests NATS had already sent us;
        draining the endpoint's subscription first hands each of them to the pool.
        """
        if self._service is None:
            return
        for endpoint in self._service._endpoints:
            subscription = endpoint._subscription
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.drain()
        with contextlib.suppress(nats.errors.Error):
            await self._service.stop()
        self._service = None
