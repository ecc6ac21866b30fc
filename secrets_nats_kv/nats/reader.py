"""Reading a stream in order, fast: batched direct gets, an ordered consumer as fallback.

Offline tools (`rotate-key`, `audit`, the benchmarks) read whole streams; the event log
follows its stream live. Both read here, so a stream is walked one way everywhere.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from secrets_nats_kv.errors import StorageError
from secrets_nats_kv.nats.jetstream import (
    NUM_PENDING_HEADER,
    SEQUENCE_HEADER,
    STATUS_HEADER,
    direct_get_subject,
    stream_info,
    stream_state,
    to_backend_error,
)

READ_BATCH = 2048
_API_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RawMessage:
    seq: int
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    time: float
    data: bytes
    headers: dict[str, str] | None
    pending: int = 0  # messages after this one in the stream when it was delivered


class _NoBatchGet(Exception):
    """The server does not answer batched direct gets (nats-server before 2.11)."""


_SLICE = 128  # messages handled between two chances for other tasks to run


async def stream_messages(
    nc: NATS,
    stream: str,
    subject: str,
    *,
    from_seq: int = 1,
    follow: bool = False,
    until: int | None = None,
) -> AsyncIterator[StoredMessage]:
    """A stream's messages in order from `from_seq`, to its head (or forever if following).

    `until`: the head as the caller read it; none after it is yielded (unless following).
    """
    js = nc.jetstream()
    state = await stream_state(nc, stream, _API_TIMEOUT)
    last = state.last_seq if until is None else min(until, state.last_seq)
    if not follow and (state.messages == 0 or last < from_seq):
        return
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
    )
    # Messages are handed over by a callback and taken in batches: nats-py's `messages`
    # iterator costs a task and a wait per message, which made reading the log (and
    # catching up after a flood of junk on its subjects) several times slower.
    send, receive = anyio.create_memory_object_stream[Msg](math.inf)

    async def deliver(msg: Msg) -> None:
        send.send_nowait(msg)

    try:
        sub = await js.subscribe(
            subject,
            stream=stream,
            cb=deliver,
            ordered_consumer=True,
            # A lost consumer (its node died) is noticed after two missed heartbeats.
            idle_heartbeat=1.0,
            config=config,
            # No client-side cap: a slow reader (rebuild) must not have messages dropped as
            # a "slow consumer"; the consumer's flow control bounds what is in flight.
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
    except nats.errors.Error as exc:
        raise to_backend_error(f"read {stream}", exc) from None
    try:
        with send, receive:
            while True:
                batch = [await receive.receive()]
                with contextlib.suppress(anyio.WouldBlock):
                    while True:
                        batch.append(receive.receive_nowait())
                for count, msg in enumerate(batch, 1):
                    if count % _SLICE == 0:
                        # A long batch (a catch-up, a key switch's fresh fold) must not
                        # starve the requests this process serves on the same loop.
                        await anyio.lowlevel.checkpoint()
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    if seq < from_seq:
                        continue
                    if not follow and seq > last:
                        return
                    stamp = meta.timestamp.timestamp() if meta.timestamp else 0.0
                    yield StoredMessage(seq, stamp, msg.data, msg.headers, meta.num_pending)
                    if not follow and (seq >= last or meta.num_pending == 0):
                        return
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def read_stream(nc: NATS, stream: str, subjects: str) -> AsyncGenerator[RawMessage, None]:
    """Every message of `stream` up to its head as read now, in order (gaps skipped).

    Batched direct gets read about 1.4 times as fast as nats-py's ordered consumer
    (bench_replay, 100k events: 28,700 against 19,900 a second); servers without them
    fall back to the ordered consumer (`stream_messages`).
    """
    info = await stream_info(nc, stream, _API_TIMEOUT)
    if info is None or info.state.messages == 0:
        return
    try:
        async for raw in _batched_direct_get(nc, stream, info.state.last_seq, info.state.messages):
            yield raw
        return
    except _NoBatchGet:
        pass
    async for raw in read_stream_ordered(nc, stream, subjects):
        yield raw


async def read_stream_ordered(
    nc: NATS, stream: str, subjects: str
) -> AsyncGenerator[RawMessage, None]:
    """The fallback reader (an ordered consumer), for servers without batched direct get."""
    async for message in stream_messages(nc, stream, subjects):
        yield RawMessage(message.seq, message.data, dict(message.headers or {}))


async def get_message(nc: NATS, stream: str, seq: int) -> RawMessage | None:
    """One message from the stream's leader, or None if that position is a gap."""
    try:
        msg = await nc.jetstream(timeout=_API_TIMEOUT).get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    except nats.errors.Error as exc:
        raise to_backend_error(f"read {stream} #{seq}", exc) from None
    return RawMessage(seq, msg.data or b"", dict(msg.headers or {}))


async def _batched_direct_get(
    nc: NATS, stream: str, last_seq: int, messages: int
) -> AsyncGenerator[RawMessage, None]:
    """Direct-get batches until `messages` messages up to `last_seq` have been read."""
    inbox = nc.new_inbox()
    batch: list[RawMessage] = []
    done = anyio.Event()
    unsupported = False

    async def on_message(msg: Msg) -> None:
        nonlocal done, unsupported
        headers = msg.headers or {}
        if STATUS_HEADER in headers:
            done.set()  # 204 end of batch, or 404 nothing at or after the asked sequence
            return
        if NUM_PENDING_HEADER not in headers:
            unsupported = True  # a single-message reply: `batch` was not understood
            done.set()
            return
        batch.append(RawMessage(int(headers[SEQUENCE_HEADER]), msg.data, headers))

    sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=4 * READ_BATCH)
    try:
        seq, seen, idle_deadline = 1, 0, 0.0
        while seen < messages and seq <= last_seq:
            request = msgspec.json.encode({"seq": seq, "batch": READ_BATCH})
            try:
                with anyio.fail_after(_API_TIMEOUT):
                    await nc.publish(direct_get_subject(stream), request, reply=inbox)
                    await done.wait()
            except TimeoutError:
                raise StorageError(f"read {stream}", "timed out") from None
            except nats.errors.Error as exc:
                raise to_backend_error(f"read {stream}", exc) from None
            if unsupported:
                raise _NoBatchGet()
            got, batch, done = batch, [], anyio.Event()
            for raw in got:
                if raw.seq > last_seq:
                    return  # written after we started: not part of this read
                seen += 1
                seq = raw.seq + 1
                yield raw
            if got:
                idle_deadline = 0.0
                continue
            if seen == 0:
                # Nothing from the start: a server that looked up exactly `seq` (no batch
                # support) and found a gap. The ordered consumer reads any server.
                raise _NoBatchGet()
            # Nothing new although messages are missing: a replica behind its leader.
            now = time.monotonic()
            idle_deadline = idle_deadline or now + _API_TIMEOUT
            if now > idle_deadline:
                raise StorageError(f"read {stream}", f"read {seen} of {messages} messages")
            await anyio.sleep(0.02)  # bounded poll: no event tells us the replica caught up
    finally:
        await sub.unsubscribe()
