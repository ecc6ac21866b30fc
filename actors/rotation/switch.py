"""After an online swap: wait until every backend the precheck saw serves under the new key.

A backend switches once the swapped log is whole (`actors.keyswitch`); until then it
serves gets from its old state, and tags what it writes (access batches) with the old
key. The command returns only once each instance it saw reports the new key as its
current one in its micro-service stats (`$SRV.STATS.secrets-nats-kv.{id}`), so the
operator may roll the backends to "new only" right away and the access log's re-tag
(`access`) runs after the last old-key batch. An instance that stopped answering (it
was stopped, or died) is not waited for: it starts under the new key, or refuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
import nats.errors

from actors.rotation.context import RotationRun
from actors.rotation.precheck import BackendKeys
from actors.service import SERVICE_NAME, STATS_KEYS
from secrets_nats_kv.nats.jetstream import to_backend_error

SWITCH_WAIT_S = 60.0  # a backend re-folds the whole log before it switches
POLL_S = 0.05  # between two stats requests to an instance still on the old key
STATS_TIMEOUT_S = 1.0


async def wait_for_switch(run: RotationRun, backends: Sequence[BackendKeys]) -> list[str]:
    """Wait (bounded) for each instance to serve under the new key; those that did not."""
    pending = [backend.instance for backend in backends]
    with anyio.move_on_after(SWITCH_WAIT_S):
        for instance in list(pending):
            while (current := await _current_key(run, instance)) is not None:
                if current == run.new.public_key:
                    break
                # A poll, bounded by SWITCH_WAIT_S, because no event exists for it: a
                # backend's switch writes nothing to JetStream (no entry, no anchor: it
                # only refolds the log and swaps its state in memory), and the key it
                # serves under is known only from its `$SRV.STATS` reply, which comes
                # on request. The admin role subscribes to nothing but its own inboxes
                # and the rotation lock, so a "switched" notice from the backend would
                # be a new subject and a new grant on both roles.
                await anyio.sleep(POLL_S)
            pending.remove(instance)
    return pending


async def _current_key(run: RotationRun, instance: str) -> str | None:
    """The key `instance` serves under now ("" if its stats do not say), None if gone."""
    subject = f"$SRV.STATS.{SERVICE_NAME}.{instance}"
    try:
        reply = await run.nc.request(subject, b"", timeout=STATS_TIMEOUT_S)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    except nats.errors.Error as exc:
        raise to_backend_error(f"ask {instance} for its stats", exc) from None
    try:
        stats = msgspec.json.decode(reply.data)
    except msgspec.DecodeError:
        return ""
    wanted = f"{run.names.subject_prefix}.>"
    for endpoint in stats.get("endpoints") or [] if isinstance(stats, dict) else []:
        if isinstance(endpoint, dict) and endpoint.get("subject") == wanted:
            keys = (endpoint.get("data") or {}).get(STATS_KEYS) or {}
            return str(keys.get("encryption") or "") if isinstance(keys, dict) else ""
    return ""
