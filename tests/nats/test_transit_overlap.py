"""Transit key rotation without breaking running hosts: the previous key stays accepted.

A wasmCloud host fetches `server_xkey` once per backend and caches it for the life of
its process. Guaranteed here: after the transit key is rotated, a backend started with
the old key among its previous transit keys (1) answers `server_xkey` with the new key
only, (2) still opens and answers gets sealed to the old key, sealed back to the host
as usual, (3) names the key each get used in the access log, and (4) shows per previous
key when it was last used and by which verified hosts, so the operator knows when it is
safe to drop. Without the overlap the same get fails with `DecryptionError`, and a key
that was never ours is refused either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from actors.service import SERVICE_NAME
from events.access import AccessRecord, access_stream_name, access_subject, decode_access
from events.log import stream_messages
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.errors import DecryptionError
from secrets_nats_kv.xkeys import XKey
from support.harness import Clients, Identity, Keys, cli_env, run_cli, running_backend

pytestmark = pytest.mark.anyio

DEADLINE_S = 10.0
VALUE = "transit-overlap-value"


async def access_records(nc: NATS, backend_name: str, count: int) -> list[AccessRecord]:
    """The first `count` access records, followed as they are stored."""
    records: list[AccessRecord] = []
    stored = stream_messages(
        nc, access_stream_name(backend_name), access_subject(backend_name), follow=True
    )
    with anyio.fail_after(DEADLINE_S):
        async with contextlib.aclosing(stored):
            async for message in stored:
                records += decode_access(message.data)
                if len(records) >= count:
                    break
    return records


async def endpoint_stats(nc: NATS) -> dict[str, Any]:
    """The secrets endpoint's stats data of the one backend on the server."""
    reply = await nc.request(f"$SRV.STATS.{SERVICE_NAME}", b"", timeout=DEADLINE_S)
    [endpoint] = json.loads(reply.data)["endpoints"]
    data: dict[str, Any] = endpoint["data"]
    return data


@dataclasses.dataclass
class Rotated:
    """A backend whose transit key was just rotated, and what a host cached before."""

    clients: Clients
    identity: Identity
    old: XKey  # the transit key the host cached
    new: XKey


@contextlib.asynccontextmanager
async def rotated(
    nats_server: NatsServer, *, keep_old: bool, others: tuple[XKey, ...] = ()
) -> AsyncIterator[Rotated]:
    """A secret written and read under transit key K1, then a backend on K2 whose previous
    transit keys are K1 (if `keep_old`) and `others`; the encryption key is unchanged."""
    old = Keys()
    identity = Identity()
    async with running_backend(nats_server.url, old) as before:
        await before.admin.put_secret("db", VALUE)
        await before.admin.add_mapping(identity.entity_key, ["db"])
        assert await before.host.server_xkey() == old.transit.public_key  # what a host caches
        assert (await before.get(identity, "db")).string_secret == VALUE
    new = Keys(encryption=old.encryption)
    previous = ((old.transit,) if keep_old else ()) + others
    async with running_backend(nats_server.url, new, previous_transit_keys=previous) as after:
        yield Rotated(after, identity, old.transit, new.transit)


async def test_a_host_with_the_cached_old_key_keeps_getting_secrets(
    nats_server: NatsServer,
) -> None:
    async with rotated(nats_server, keep_old=True) as r:
        assert await r.clients.host.server_xkey() == r.new.public_key  # only the current

        sealed_to_old = await r.clients.get(r.identity, "db", transit=r.old.public_key)
        assert sealed_to_old.string_secret == VALUE
        sealed_to_new = await r.clients.get(r.identity, "db")  # a host that restarted
        assert sealed_to_new.string_secret == VALUE

        records = await access_records(r.clients.admin.nc, r.clients.names.name, 3)
        assert [record.transit_key for record in records] == [
            r.old.public_key,  # before the rotation, K1 was the current key
            r.old.public_key,
            r.new.public_key,
        ]
        assert all(record.granted for record in records)
        [usage] = (await endpoint_stats(r.clients.admin.nc))["previous_transit_keys"]
        assert usage["public_key"] == r.old.public_key
        assert usage["requests"] == 1  # the get sealed to K2 is not a use of K1
        assert usage["hosts"] == [r.identity.host.public_key]
        assert usage["last_used"] is not None

        status = await anyio.to_thread.run_sync(  # the backend runs on this event loop
            lambda: run_cli("status", "--nats-address", nats_server.url, env=cli_env())
        )
        assert status.returncode == 0, status.stderr
        line = status.stdout.decode()
        assert f"transit {r.new.public_key}" in line
        assert f"previous transit {r.old.public_key} last used " in line
        assert " by 1 host\t" in line


async def test_without_the_overlap_the_cached_old_key_fails(nats_server: NatsServer) -> None:
    async with rotated(nats_server, keep_old=False) as r:
        with pytest.raises(DecryptionError):
            await r.clients.get(r.identity, "db", transit=r.old.public_key)
        assert (await endpoint_stats(r.clients.admin.nc))["previous_transit_keys"] == []


async def test_a_key_that_was_never_ours_is_refused_and_counts_for_nothing(
    nats_server: NatsServer,
) -> None:
    stranger = XKey.generate()
    async with rotated(nats_server, keep_old=True, others=(XKey.generate(),)) as r:
        with pytest.raises(DecryptionError):
            await r.clients.get(r.identity, "db", transit=stranger.public_key)
        usages = (await endpoint_stats(r.clients.admin.nc))["previous_transit_keys"]
        assert [usage["requests"] for usage in usages] == [0, 0]
        assert [usage["hosts"] for usage in usages] == [[], []]


def test_run_refuses_a_bad_previous_transit_key_in_one_line() -> None:
    keys = Keys()
    cases = {
        "not a seed": "SXnot-a-seed",
        "the current key again": keys.transit.seed,
    }
    for why, previous in cases.items():
        done = run_cli(
            "run", "--nats-address", "127.0.0.1:1",
            env=cli_env(keys, PREVIOUS_TRANSIT_XKEY_SEEDS=previous),
        )  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode != 0, why
        assert err.startswith("secrets-nats-kv: error:"), (why, err)
        assert err.count("\n") == 1, (why, err)
        assert "Traceback" not in err
        assert previous not in err  # never echo a seed, even a broken one


def test_run_reads_previous_transit_keys_from_a_file_and_names_a_bad_line(
    tmp_path: Path,
) -> None:
    keys = Keys()
    good = XKey.generate()
    seeds = tmp_path / "previous-transit.seeds"
    seeds.write_text(f"# rotated 2026-11\n{good.seed}\n\nSXbroken\n")
    done = run_cli(
        "run", "--nats-address", "127.0.0.1:1", "--previous-transit-xkey-seeds-file", str(seeds),
        env=cli_env(keys),
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode != 0
    assert err.startswith("secrets-nats-kv: error: previous transit key (")
    assert f"{seeds} line 4" in err
    assert good.seed not in err
    assert err.count("\n") == 1
