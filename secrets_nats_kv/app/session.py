"""A CLI command's NATS connection: how it ends, and why no backend answers on it.

A command is cancelled by a signal at any moment, so its connection is closed shielded
and within a bound. When no backend answers, the likeliest reason worth naming is that
the buckets are still the original's (not yet imported); `rotate-key` asks the same.
"""

from __future__ import annotations

import argparse
import contextlib

import anyio
from nats.aio.client import Client as NATS

from secrets_nats_kv.app.arguments import backend_names
from secrets_nats_kv.errors import SecretsBackendError


async def close(nc: NATS) -> None:
    """Close a CLI connection even while being cancelled (a signal), within a bound."""
    with anyio.move_on_after(2, shield=True), contextlib.suppress(OSError):
        await nc.close()


async def why_silent(nc: NATS, args: argparse.Namespace) -> SecretsBackendError | None:
    """The buckets' reason no backend answers (they are the original's), if that is it."""
    from events.log import EventLog
    from projections.foreign import why_no_backend

    names = backend_names(args)
    try:
        log_exists = await EventLog(nc, backend_name=names.name, barrier=None).exists()
    except SecretsBackendError:
        return None
    return await why_no_backend(nc, names.secrets_bucket, names.state_bucket, log_exists=log_exists)
