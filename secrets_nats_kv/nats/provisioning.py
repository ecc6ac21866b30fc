"""Streams made, reshaped and removed: every stream this project keeps is created here.

Split from `jetstream` (which owns the error codes and the reads) because creating a
replicated stream has a rule of its own: a cluster that has just formed reports healthy
before its meta leader has heard from every peer, and for a moment refuses to place a
replicated stream ("no suitable peers for placement"). `run --replicas 3` started then
must wait that out, boundedly, not exit.
"""

from __future__ import annotations

import logging
import time

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from secrets_nats_kv.nats.jetstream import (
    CLUSTER_NOT_AVAILABLE,
    NO_SUITABLE_PEERS,
    to_backend_error,
)

log = logging.getLogger(__name__)

# A new cluster reports healthy before its meta leader has heard from every peer: for a
# moment a replicated stream cannot be placed. Waited out this long, then the error stands
# (the same code also means placement tags no node has, which no wait mends).
PLACEMENT_WAIT_S = 30.0
_TRANSIENT_PLACEMENT = frozenset({NO_SUITABLE_PEERS, CLUSTER_NOT_AVAILABLE})


async def create_stream(
    nc: NATS,
    config: api.StreamConfig,
    api_timeout: float,
    placement_wait: float = PLACEMENT_WAIT_S,
) -> None:
    """Create a stream that must not exist yet (`StreamNameInUse` if one does, differently);
    a cluster still forming is waited out as in `ensure_stream`."""
    waiting = _PlacementWait(config.name or "", placement_wait)
    while True:
        try:
            await nc.jetstream(timeout=api_timeout).add_stream(config)
            return
        except nats.errors.Error as exc:
            if not await waiting.again(exc):
                raise to_backend_error(f"create stream {config.name}", exc) from None


async def ensure_stream(
    nc: NATS,
    config: api.StreamConfig,
    api_timeout: float,
    placement_wait: float = PLACEMENT_WAIT_S,
) -> api.StreamInfo | None:
    """Create the stream if it is missing: its info if it existed, None if created here.

    Two processes starting at once may both find it missing; the loser's create fails
    with "already in use", which is what it wanted. A cluster still forming (`is_transient_
    placement`) is waited out for up to `placement_wait` seconds, looking again each time
    (another process may have created the stream meanwhile).
    """
    js = nc.jetstream(timeout=api_timeout)
    name = config.name or ""
    waiting = _PlacementWait(name, placement_wait)
    while True:
        try:
            return await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.Error as exc:
            if not await waiting.again(exc):
                raise to_backend_error(f"stream info {name}", exc) from None
            continue
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if "already in use" in str(exc.description or ""):
                return None
            if not await waiting.again(exc):
                raise to_backend_error(f"create stream {name}", exc) from None
            continue
        except nats.errors.Error as exc:
            if not await waiting.again(exc):
                raise to_backend_error(f"create stream {name}", exc) from None
            continue
        return None


def is_transient_placement(exc: BaseException) -> bool:
    """Whether JetStream refused a stream only because its cluster is still forming."""
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _TRANSIENT_PLACEMENT


class _PlacementWait:
    """The bounded wait for a forming cluster: backoff, one log line, then give up."""

    def __init__(self, stream: str, budget: float) -> None:
        self._stream = stream
        self._deadline = time.monotonic() + budget
        self._delay = 0.1
        self._logged = False

    async def again(self, exc: BaseException) -> bool:
        """Sleep and say True if `exc` is transient and time is left, else False."""
        if not is_transient_placement(exc) or time.monotonic() >= self._deadline:
            return False
        if not self._logged:
            self._logged = True
            log.warning(
                "JetStream cannot place the stream yet (the cluster is still forming); "
                "trying again",
                extra={"stream": self._stream, "error": str(getattr(exc, "description", exc))},
            )
        await anyio.sleep(min(self._delay, max(0.0, self._deadline - time.monotonic())))
        self._delay = min(self._delay * 2, 2.0)
        return True


async def update_stream(nc: NATS, config: api.StreamConfig, api_timeout: float) -> None:
    """Replace a stream's configuration (one atomic update)."""
    try:
        await nc.jetstream(timeout=api_timeout).update_stream(config)
    except nats.errors.Error as exc:
        raise to_backend_error(f"update stream {config.name}", exc) from None


async def stream_config(nc: NATS, stream: str, api_timeout: float) -> api.StreamConfig:
    """A stream's whole configuration, to change a field and `update_stream` it."""
    try:
        info = await nc.jetstream(timeout=api_timeout).stream_info(stream)
    except nats.errors.Error as exc:
        raise to_backend_error(f"stream info {stream}", exc) from None
    return info.config
