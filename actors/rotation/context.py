"""One run's names, keys and helpers, shared by the plan, the copy and the swap.

The staging stream, `SECRETS_{name}_events_rotating` (subjects
`wasmcloud_secrets_rotating.{name}.>`, so it never overlaps the live log), carries the
run's state in its metadata: `staging` until committed, then `committed`, with the old
and the new public key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS

from actors.crashpoints import CrashPoints
from actors.rotation.precheck import BackendKeys
from events.log import EventLog, stream_name, subject_prefix
from events.types import KeyRotated, UndecodableEvent, decode_event
from projections.kv import KvLayout
from secrets_nats_kv import streams
from secrets_nats_kv.barrier import ENTRY_TAG_HEADER as TAG_HEADER
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.nats.jetstream import (
    delete_stream,
    stream_info,
    stream_state,
    to_backend_error,
)
from secrets_nats_kv.nats.positioned import PositionedPublisher
from secrets_nats_kv.nats.reader import RawMessage, get_message
from secrets_nats_kv.nkeys import SigningKey
from secrets_nats_kv.xkeys import XKey

STATE_KEY = "secrets-nats-kv-rotation"  # staging stream metadata: "staging" | "committed"
NEW_KEY_KEY = "secrets-nats-kv-new-key"
OLD_KEY_KEY = "secrets-nats-kv-old-key"
STAGING, COMMITTED = "staging", "committed"
API_TIMEOUT = 5.0


staging_stream_name = streams.staging_stream  # the names: secrets_nats_kv.streams
staging_subject_prefix = streams.staging_subject_prefix


@dataclass(frozen=True)
class Staging:
    """What the staging stream says about an earlier run."""

    state: str  # "staging" | "committed"
    new_key: str
    old_key: str
    replicas: int
    last_seq: int
    marker: RawMessage | None  # the final KeyRotated, if staging is complete for the new key


class RotationRun:
    """The streams, keys and callbacks of one `rotate-key` run."""

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        layout: KvLayout,
        old: XKey,
        new: XKey,
        progress: Callable[[int, int], None] | None,
        crash: CrashPoints,
    ) -> None:
        self.nc = nc
        self.names = names
        self.layout = layout
        self.old, self.new = old, new
        self.progress = progress
        self.crash = crash
        self.live = stream_name(names.name)
        self.live_prefix = subject_prefix(names.name)
        self.staging = staging_stream_name(names.name)
        self.staging_prefix = staging_subject_prefix(names.name)
        self.old_auth = Barrier(old)
        self.new_auth = Barrier(new)
        self.started = time.monotonic()
        self.subjects = EventLog(nc, backend_name=names.name, barrier=None)
        self.fenced_seconds: float | None = None  # how long writes stood fenced (online)
        self.backends: Sequence[BackendKeys] = ()  # online: the instances to wait for
        self.unswitched: list[str] = []  # online: instances not on the new key in time
        self.signer: SigningKey | None = None  # AUDIT_SIGNING_SEED: signs the new anchor
        self.anchor_signer: str | None = None  # the anchor this run wrote: "" unsigned

    def tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    async def checkpoint(self, point: str, publisher: PositionedPublisher | None = None) -> None:
        """A crash point: stop here if the caller's hook says so (publishes flushed first)."""
        if self.crash.reached(point):
            if publisher is not None:
                await publisher.flush()
            self.crash.stop()

    async def live_head(self) -> int:
        return (await stream_state(self.nc, self.live, API_TIMEOUT)).last_seq

    async def backend_answers(self) -> bool:
        """Whether any backend answers on this backend name's subject now."""
        try:
            await self.nc.request(self.names.subject("server_xkey"), b"", timeout=1.0)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        except nats.errors.Error as exc:
            raise to_backend_error("probe backends", exc) from None
        return True

    async def get(self, stream: str, seq: int) -> RawMessage | None:
        return await get_message(self.nc, stream, seq)

    async def delete(self, stream: str) -> None:
        await delete_stream(self.nc, stream, API_TIMEOUT)

    def is_marker(self, raw: RawMessage | None) -> bool:
        """Whether `raw` is a KeyRotated to the new key, tagged for the new key where it is."""
        if raw is None or not self.new_auth.verify(raw.seq, raw.data, raw.headers.get(TAG_HEADER)):
            return False
        try:
            event = decode_event(raw.data)
        except UndecodableEvent:
            return False
        return isinstance(event, KeyRotated) and event.new_key == self.new.public_key

    async def inspect_staging(self) -> Staging | None:
        info = await stream_info(self.nc, self.staging, API_TIMEOUT)
        if info is None:
            return None
        metadata = info.config.metadata or {}
        last_seq = info.state.last_seq
        marker = await self.get(self.staging, last_seq) if last_seq else None
        return Staging(
            state=metadata.get(STATE_KEY, STAGING),
            new_key=metadata.get(NEW_KEY_KEY, "?"),
            old_key=metadata.get(OLD_KEY_KEY, "?"),
            replicas=info.config.num_replicas,
            last_seq=last_seq,
            marker=marker if self.is_marker(marker) else None,
        )
