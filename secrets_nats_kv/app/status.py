"""`secrets-nats-kv status`: a health check for a process supervisor or a container.

It reads the event log's last sequence, then asks every instance for its micro-service
stats (`$SRV.STATS.secrets-nats-kv`), keeps those serving this backend's subject, and
prints one line per instance: its id and version, how far its view has applied the log,
the public keys it holds, and its incidents. It exits 0 only when at least one instance
answered and every one that answered is caught up (its view at or past the sequence read
first) and has no incident; otherwise it exits 1 and says why on stderr.

Instances register as micro services only once caught up, so "answers" already means
"was ready"; "caught up" here means "is keeping up now".
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.service import (
    SERVICE_NAME,
    STATS_INCIDENTS,
    STATS_KEYS,
    STATS_PREVIOUS_TRANSIT,
    STATS_VIEW_SEQ,
)
from secrets_nats_kv.app.commands import _close, backend_names, nats_options, plural
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import ConfigError, StorageError
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_state

STATS_SUBJECT = f"$SRV.STATS.{SERVICE_NAME}"
_QUIET_S = 0.3  # after the last reply, this long without another ends the gathering


@dataclass
class Instance:
    """One instance's stats reply, reduced to what status judges."""

    id: str
    version: str
    view_seq: int
    keys: dict[str, Any]
    incidents: list[dict[str, Any]] = field(default_factory=list)
    previous_transit: list[dict[str, Any]] = field(default_factory=list)

    def problems(self, log_seq: int) -> list[str]:
        found = []
        if self.view_seq < log_seq:
            found.append(f"behind the log by {plural(log_seq - self.view_seq, 'event')}")
        for incident in self.incidents:
            count = int(incident.get("count", 1))
            found.append(
                f"incident {incident.get('kind')}: {incident.get('detail')} "
                f"({plural(count, 'time')})"
            )
        return found

    def line(self, log_seq: int) -> str:
        problems = self.problems(log_seq)
        admin = self.keys.get("admin") or []
        return (
            f"{self.id}\tversion {self.version}\tview at {self.view_seq} of {log_seq}\t"
            f"transit {self.keys.get('transit')}\t{self._previous_transit()}"
            f"encryption {self.keys.get('encryption')}\t{self._next_encryption()}"
            f"{plural(len(admin), 'admin key')}\t" + ("; ".join(problems) if problems else "ok")
        )

    def _next_encryption(self) -> str:
        """The key an online rotation may move to, when the instance holds one."""
        following = self.keys.get("next_encryption")
        return f"next encryption {following}\t" if following else ""

    def _previous_transit(self) -> str:
        """Per previous transit key: when a host last used it, so it can be dropped."""
        parts = []
        for usage in self.previous_transit:
            last = usage.get("last_used")
            when = "never used" if not last else f"last used {_iso(float(last))}"
            hosts = plural(len(usage.get("hosts") or []), "host")
            parts.append(f"previous transit {usage.get('public_key')} {when} by {hosts}\t")
        return "".join(parts)


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instance(data: bytes, names: BackendNames) -> Instance | None:
    """The instance behind one stats reply, if it serves `names`' subject."""
    try:
        reply = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(reply, dict):
        return None
    wanted = f"{names.subject_prefix}.>"
    for endpoint in reply.get("endpoints") or []:
        if not isinstance(endpoint, dict) or endpoint.get("subject") != wanted:
            continue
        stats = endpoint.get("data") or {}
        if not isinstance(stats, dict):
            return None
        return Instance(
            id=str(reply.get("id", "?")),
            version=str(reply.get("version", "?")),
            view_seq=int(stats.get(STATS_VIEW_SEQ, 0)),
            keys=dict(stats.get(STATS_KEYS) or {}),
            incidents=list(stats.get(STATS_INCIDENTS) or []),
            previous_transit=list(stats.get(STATS_PREVIOUS_TRANSIT) or []),
        )
    return None


async def gather(nc: NATS, names: BackendNames, wait_s: float) -> list[Instance]:
    """Every instance that answers the stats request within `wait_s` seconds."""
    inbox = nc.new_inbox()
    send, receive = anyio.create_memory_object_stream[Msg](256)
    sub = await nc.subscribe(inbox, cb=send.send)
    replies: list[Msg] = []
    try:
        await nc.publish(STATS_SUBJECT, b"", reply=inbox)
        with anyio.move_on_after(wait_s):
            async with receive:
                replies.append(await receive.receive())
                while True:
                    with anyio.move_on_after(_QUIET_S) as quiet:
                        replies.append(await receive.receive())
                    if quiet.cancelled_caught:
                        break
    finally:
        send.close()
        await sub.unsubscribe()
    found = [parse_instance(msg.data, names) for msg in replies]
    return sorted((i for i in found if i is not None), key=lambda i: i.id)


async def cmd_status(args: argparse.Namespace) -> int:
    from events.log import stream_name

    names = backend_names(args)
    nc = await connect(nats_options(args), name="secrets-nats-kv status", persistent=False)
    try:
        try:
            log_seq = (await stream_state(nc, stream_name(names.name), 5.0)).last_seq
        except StorageError as exc:
            raise ConfigError(f"status: {exc}; is -n {names.name} right?") from None
        instances = await gather(nc, names, args.timeout)
    finally:
        await _close(nc)
    for instance in instances:
        sys.stdout.write(instance.line(log_seq) + "\n")
    sys.stdout.flush()
    if not instances:
        raise ConfigError(
            f"status: no instance of backend {names.name} answered within {args.timeout:g}s"
        )
    sick = [i for i in instances if i.problems(log_seq)]
    if sick:
        sys.stderr.write(
            f"secrets-nats-kv: unhealthy: {plural(len(sick), 'instance')} of "
            f"{len(instances)} behind or with an incident\n"
        )
        return 1
    return 0
