"""The benchmark's fixtures: its scale, its identities and data, and the event log (and
KV view) written fast, through the positioned publisher, as a backend would have written them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors

from bench.load import (
    GetWorkload,
    secret_value,
)
from events.log import EventLog
from events.types import Event, MappingAdded, SecretPut
from projections.kv import KvBuckets, KvLayout
from secrets_nats_kv import wire
from secrets_nats_kv.barrier import GENESIS, KV_TAG_HEADER, Barrier
from secrets_nats_kv.config import KIND_HEADER, BackendNames
from secrets_nats_kv.nats.jetstream import stream_state
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.streams import kv_stream, kv_subject
from secrets_nats_kv.xkeys import SealBox, XKey
from tests.support.tokens import mint_component_jwt, mint_host_jwt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
QUEUEING_MS = 100.0  # a fixed-rate p50 above this is time spent queued, not serving


# --- scale -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How big one run is; the default fits in < 5 minutes on 2 cores, `--quick` in ~1."""

    secrets: int = 10_000
    entities: int = 1_000
    hosts: int = 20
    cold_events: int = 100_000
    warmup_s: float = 2.0
    measure_s: float = 5.0
    rates: tuple[float, ...] = (200.0, 1000.0)
    get_bank: int = 30_000  # sealed gets prepared for one saturation run (all processes)
    echo_bank: int = 600_000
    concurrency: int = 64  # outstanding requests per generator process at saturation
    verify_every: int = 25  # at saturation; open-loop runs open every reply
    puts_sequential: int = 400
    puts_concurrent: int = 1_500
    put_concurrency: int = 16
    put_time_s: float = 6.0


DEFAULT = Scale()
QUICK = Scale(
    secrets=2_000,
    entities=200,
    hosts=10,
    cold_events=10_000,
    warmup_s=0.5,
    measure_s=2.0,
    rates=(200.0, 500.0),
    get_bank=8_000,
    echo_bank=150_000,
    concurrency=32,
    puts_sequential=100,
    puts_concurrent=300,
    put_time_s=2.0,
)


# --- identities and data -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Backend keys, an account, entities with their component JWTs and secrets, host JWTs."""

    transit: XKey
    encryption: XKey
    account: SigningKey
    entities: tuple[tuple[str, str, tuple[str, ...]], ...]  # (public key, JWT, secret names)
    host_jwts: tuple[str, ...]

    @classmethod
    def make(cls, secrets: int, entities: int, hosts: int) -> Dataset:
        account = SigningKey.generate(Role.ACCOUNT)
        per_entity = max(1, secrets // entities)
        rows = []
        for i in range(entities):
            module = SigningKey.generate(Role.MODULE)
            names = tuple(
                secret_name(j) for j in range(i * per_entity, min(secrets, (i + 1) * per_entity))
            )
            jwt = mint_component_jwt(account, module.public_key, name=f"component-{i}")
            rows.append((module.public_key, jwt, names))
        host_jwts = tuple(
            mint_host_jwt(account, SigningKey.generate(Role.SERVER).public_key, name=f"host-{h}")
            for h in range(hosts)
        )
        return cls(XKey.generate(), XKey.generate(), account, tuple(rows), host_jwts)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
        env["PYTHONPATH"] = str(REPO)
        env["TRANSIT_XKEY_SEED"] = self.transit.seed
        env["ENCRYPTION_XKEY_SEED"] = self.encryption.seed
        return env

    def workload(self, names: BackendNames) -> GetWorkload:
        return GetWorkload(
            subject_prefix=names.subject_prefix,
            entities=tuple((jwt, secrets) for _, jwt, secrets in self.entities),
            host_jwts=self.host_jwts,
        )

    def secret_names(self) -> list[str]:
        return [name for _, _, names in self.entities for name in names]


def secret_name(index: int) -> str:
    return f"bench-secret-{index:06d}"


def get_sizes(data: Dataset, secrets: int) -> tuple[int, int]:
    """Bytes of a real sealed get request and of a real sealed get reply."""
    _, jwt, names = data.entities[-1]
    body = wire.encode_secret_request(
        wire.SecretRequest(
            key=names[-1],
            context=wire.Context(jwt, data.host_jwts[0], wire.Application(name="bench-app")),
        )
    )
    request = len(XKey.generate().seal(body, data.transit))
    reply_body = wire.encode_secret_response(
        wire.Secret.of_string(str(secrets), secret_value(names[-1]))
    )
    return request, len(XKey.generate().seal(reply_body, data.transit))


def event_provenance(admin: XKey) -> dict[str, Any]:
    return {
        "at": time.time(),
        "admin_key": admin.public_key,
        "authenticated": True,
        "request_id": uuid.uuid4().hex,
    }


def dataset_events(data: Dataset) -> Iterator[Event]:
    """The log a backend would have after putting every secret and adding every mapping."""
    at_rest = SealBox(data.encryption, data.encryption)
    for name in data.secret_names():
        yield SecretPut(
            name=name,
            sealed=at_rest.seal(secret_value(name).encode()),
            **event_provenance(data.transit),
        )
    for entity, _, names in data.entities:
        yield MappingAdded(entity=entity, secrets=names, **event_provenance(data.transit))


def put_events(encryption: XKey, admin: XKey, count: int, prefix: str) -> Iterator[SecretPut]:
    at_rest = SealBox(encryption, encryption)
    for i in range(count):
        name = f"{prefix}-{i:06d}"
        yield SecretPut(
            name=name, sealed=at_rest.seal(secret_value(name).encode()), **event_provenance(admin)
        )


# --- writing a log (and its KV view) fast ----------------------------------------------------


async def write_log(
    url: str,
    names: BackendNames,
    encryption: XKey,
    events: Iterable[Event],
    *,
    write_kv: bool,
) -> int:
    """Append `events` to the backend's log (tagged as its appender tags them) and, if
    `write_kv`, write the secrets bucket exactly as its KV writer would (a restart then
    finds its views current)."""
    nc = await nats.connect(url, name="bench setup", pending_size=256 * 1024 * 1024)
    try:
        barrier = Barrier(encryption)
        log = EventLog(nc, backend_name=names.name, barrier=barrier)
        await log.ensure()
        layout = KvLayout(names.secrets_bucket, names.state_bucket)
        await KvBuckets(nc, layout).ensure()
        first = (await log.state()).last_seq + 1
        previous = GENESIS
        if first > 1:  # appending: follow the chain where the log ends
            async for entry in log.entries():
                previous = entry.link or previous
        puts: list[SecretPut] = []
        count = 0
        # Pinned like the appender's publishes (which name the stream too).
        async with PositionedPublisher(nc, log.stream, window=2048) as publisher:
            for seq, event in enumerate(events, start=first):
                encoded = log.encode(event, seq, previous)  # as the decider encodes it
                previous = encoded.link
                if isinstance(event, SecretPut):
                    puts.append(event)
                await publisher.publish(seq, log.subject_for(event), encoded.body, encoded.headers)
                count += 1
            await publisher.drain()
        if write_kv:
            bucket = kv_stream(names.secrets_bucket)
            last = (await stream_state(nc, bucket, 5)).last_seq
            # Pinned like the KV writer's writes (which do not name the stream).
            async with PositionedPublisher(nc, bucket, window=2048, expect_stream=False) as kv:
                for rev, put in enumerate(puts, start=last + 1):
                    subject = kv_subject(names.secrets_bucket, put.name)
                    tag = barrier.kv_tag(names.secrets_bucket, put.name, rev, put.sealed)
                    headers = {KIND_HEADER: put.kind, KV_TAG_HEADER: tag}  # as the writer tags
                    await kv.publish(rev, subject, put.sealed, headers)
                await kv.drain()
        return count
    finally:
        await nc.close()


async def wait_kv(
    url: str, names: BackendNames, secrets: int, mappings: int, limit: float
) -> float:
    """Wait (bounded) until a backend's KV writer has written both buckets; seconds taken."""
    nc = await nats.connect(url, name="bench kv wait")
    started = time.monotonic()
    try:
        while True:
            s = await stream_state(nc, kv_stream(names.secrets_bucket), 5)
            m = await stream_state(nc, kv_stream(names.state_bucket), 5)
            if s.last_seq >= secrets and m.last_seq >= mappings:
                return time.monotonic() - started
            if time.monotonic() - started > limit:
                raise TimeoutError(f"KV view at {s.last_seq}/{m.last_seq} after {limit:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
