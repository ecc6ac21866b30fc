"""The original Rust secrets-nats-kv's buckets, made exactly as it makes them.

The original creates both buckets with async-nats's `create_key_value`, whose stream
config is what `original_stream_config` builds (PROTOCOL.md §7): `deny_delete`, rollup
headers allowed, discard new, direct gets, `max_msgs_per_subject` = the history (64 for
secrets, 1 for the state bucket), S2 compression. Its values are sealed by the
encryption xkey to itself; the state bucket maps an entity key to a JSON array of secret
names. Writes go through nats-py's KV API, as a stock KV client's would, so deletes and
purges leave the same markers (`KV-Operation: DEL` / `PURGE` with a subject rollup).

`stock_view` reads a bucket back as any KV client sees it: each key's history, with
revisions, values and operations. Import must leave that view unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.kv import KeyValue

from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.xkeys import SealBox, XKey

ORIGINAL_HISTORY = 64


def original_stream_config(bucket: str, history: int) -> api.StreamConfig:
    """What async-nats's `create_key_value` asks JetStream for (the original's buckets)."""
    return api.StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        max_msgs_per_subject=history,
        max_bytes=-1,
        max_msg_size=-1,
        max_age=0,
        storage=api.StorageType.FILE,
        num_replicas=1,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        allow_direct=True,
        duplicate_window=120.0,
        compression=api.StoreCompression.S2,
    )


@dataclass
class Original:
    """Writes to a NATS what the original backend (and its CLI) would have written."""

    nc: NATS
    encryption: XKey
    names: BackendNames = field(default_factory=BackendNames)
    secrets_kv: KeyValue | None = None
    state_kv: KeyValue | None = None
    # The leak registry (support.leakcheck.remember) for tests; bench leaves it out.
    remember: Callable[[bytes, str], object] | None = None

    async def create(self, *, deny_delete: bool = True) -> Original:
        """Both buckets; `deny_delete=False` makes them as a KV client that allows deletes."""
        js = self.nc.jetstream(timeout=10)
        for bucket, history in (
            (self.names.secrets_bucket, ORIGINAL_HISTORY),
            (self.names.state_bucket, 1),
        ):
            config = original_stream_config(bucket, history)
            config.deny_delete = deny_delete
            await js.add_stream(config)
        self.secrets_kv = await js.key_value(self.names.secrets_bucket)
        self.state_kv = await js.key_value(self.names.state_bucket)
        return self

    def _secrets(self) -> KeyValue:
        assert self.secrets_kv is not None, "call create() first"
        return self.secrets_kv

    def _state(self) -> KeyValue:
        assert self.state_kv is not None, "call create() first"
        return self.state_kv

    async def put(self, name: str, value: str | bytes, *, track: bool = True) -> int:
        """The original's `put_secret`: the value sealed by the encryption key to itself."""
        plaintext = value.encode() if isinstance(value, str) else value
        if track and self.remember is not None and len(plaintext) >= 8:
            self.remember(plaintext, f"original value of {name}")
        sealed = SealBox(self.encryption, self.encryption).seal(plaintext)
        return await self._secrets().put(name, sealed)

    async def delete(self, name: str) -> int:
        """A stock KV delete (`nats kv del`): a `KV-Operation: DEL` marker."""
        await self._secrets().delete(name)
        return await self._last(self.names.secrets_bucket)

    async def purge(self, name: str) -> int:
        """A stock KV purge: a `PURGE` marker that rolls up (removes) the key's history."""
        await self._secrets().purge(name)
        return await self._last(self.names.secrets_bucket)

    async def set_mapping(self, entity: str, secrets: list[str]) -> int:
        """The state bucket's entry for `entity`, as the original's add_mapping leaves it."""
        return await self._state().put(entity, msgspec.json.encode(secrets))

    async def _last(self, bucket: str) -> int:
        info = await self.nc.jetstream(timeout=5).stream_info(f"KV_{bucket}")
        return info.state.last_seq


StockEntry = tuple[str, int, bytes, str]  # key, revision, value, operation


async def write_behind_the_log(nc: NATS, bucket: str, key: str, value: bytes) -> None:
    """What an instance of the original still running does after an import: a write
    straight to the bucket, which the event log cannot explain."""
    kv = await nc.jetstream().key_value(bucket)
    await kv.put(key, value)


async def stock_view(nc: NATS, bucket: str) -> dict[str, list[StockEntry]]:
    """Every key's history as a stock KV reader sees it (nats-py's KV API)."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=">")
    prefix = f"$KV.{bucket}."
    counts = {s.removeprefix(prefix): n for s, n in (info.state.subjects or {}).items()}
    kv = await js.key_value(bucket)
    view: dict[str, list[StockEntry]] = {}
    for key in sorted(counts):
        # nats-py's history watcher can end early on a loaded machine (its "no more
        # pending" marker racing a consumer reset): read again until it has every entry
        # the stream counts for the key, as a reader that checked would.
        for _ in range(5):
            try:
                history = await kv.history(key)
            except nats.js.errors.NoKeysError:
                history = []
            if len(history) == counts[key]:
                break
        view[key] = [
            (e.key, e.revision or 0, e.value or b"", str(e.operation or "PUT")) for e in history
        ]
    return view


async def stream_config(nc: NATS, bucket: str) -> api.StreamConfig:
    return (await nc.jetstream(timeout=5).stream_info(f"KV_{bucket}")).config
