"""Every role under exactly the permissions `secrets-nats-kv nats-permissions` prints.

The server's `authorization` block is the product's own `conf` rendering, with one user
per role. Under it the whole happy path works (the backend serving, the CLI writing,
reading, exporting the audit log, rotating the key and rebuilding, a host getting a
secret), and the server logs no permission violation; and from the host role every
attack on the backend's streams and subjects is refused by the server itself, with the
streams unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from nats.aio.client import Client as NATS

from events.log import EventLog, secret_subject
from secrets_nats_kv.app.backup import _digest
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.app.permissions import render_conf, user_name
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import stream_info, stream_state
from secrets_nats_kv.permissions import (
    NatsRole,
    access_stream,
    access_subject,
    events_stream,
    inbox_prefix,
    rotation_lock_subject,
)
from secrets_nats_kv.streams import kv_stream
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, cli_env, run_cli, spawn_run, wait_until_answering
from support.host import HostClient
from support.leakcheck import remember
from support.original import Original

if TYPE_CHECKING:
    from conftest import MakeNatsServer

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
SECRET = "db-password"


@dataclass
class Bus:
    """A nats-server admitting one user per role, with that role's permissions only."""

    server: NatsServer
    passwords: dict[NatsRole, str]

    @property
    def url(self) -> str:
        return self.server.url

    def options(self, role: NatsRole) -> NatsOptions:
        return NatsOptions(
            servers=(self.url,),
            user=user_name(role),
            password=self.passwords[role],
            inbox_prefix=inbox_prefix(NAMES, role),
        )

    def flags(self, role: NatsRole) -> tuple[str, ...]:
        return ("--nats-address", self.url, "--nats-user", user_name(role))

    def env(self, role: NatsRole, keys: Keys, **extra: str) -> dict[str, str]:
        return cli_env(keys, NATS_PASSWORD=self.passwords[role], **extra)

    def violations(self) -> list[str]:
        text = self.server.config.log_file.read_text(errors="replace")
        return [line for line in text.splitlines() if "Violation" in line]


def start_bus(make_nats_server: MakeNatsServer) -> Bus:
    passwords = {role: secrets.token_urlsafe(16) for role in NatsRole}
    credentials = {
        role: f"user: {json.dumps(user_name(role))}, password: {json.dumps(passwords[role])}"
        for role in NatsRole
    }
    conf = render_conf(NAMES, list(NatsRole), credentials)
    return Bus(make_nats_server(extra_conf=conf), passwords)


@pytest.fixture
def bus(make_nats_server: MakeNatsServer) -> Bus:
    return start_bus(make_nats_server)


@pytest.fixture
def backends() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def start_backend(
    bus: Bus,
    keys: Keys,
    procs: list[subprocess.Popen[bytes]],
    log: Path,
    next_key: XKey | None = None,
) -> subprocess.Popen[bytes]:
    extra = {} if next_key is None else {"NEXT_ENCRYPTION_XKEY_SEED": next_key.seed}
    env = bus.env(NatsRole.BACKEND, keys, **extra)
    proc = spawn_run(bus.url, env, "--nats-user", user_name(NatsRole.BACKEND), log=log)
    procs.append(proc)
    try:
        await wait_until_answering(bus.options(NatsRole.HOST), NAMES)
    except TimeoutError:
        raise AssertionError(f"no backend answered; see {log}") from None
    return proc


def stop_backend(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


async def admin(bus: Bus, keys: Keys, *args: str, **env: str) -> str:
    """Run a CLI command as the admin user; its stdout, or fail with its one-line error."""
    environment = bus.env(NatsRole.ADMIN, keys, **env)
    command = (*args, *bus.flags(NatsRole.ADMIN))
    result = await anyio.to_thread.run_sync(lambda: run_cli(*command, env=environment, timeout=120))
    assert result.returncode == 0, (args, result.stderr.decode(), bus.violations())
    return result.stdout.decode()


@contextlib.asynccontextmanager
async def host_connection(bus: Bus) -> AsyncIterator[NATS]:
    nc = await connect(bus.options(NatsRole.HOST), name="host", persistent=False)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def host_nc(bus: Bus) -> AsyncIterator[NATS]:
    async with host_connection(bus) as nc:
        yield nc


async def test_every_role_works_under_its_permissions(
    bus: Bus, backends: list[subprocess.Popen[bytes]], host_nc: NATS, tmp_path: Path
) -> None:
    """Serve, write, read, audit, destroy, rotate and rebuild with no permission violation."""
    keys = Keys()
    identity = Identity()
    value = f"value-{secrets.token_hex(8)}"
    remember(value, "secret value")
    backend = await start_backend(bus, keys, backends, tmp_path / "run-1.log")

    assert await admin(bus, keys, "put", SECRET, "--string", "first") == (
        f"stored {SECRET} as version 1\n"
    )
    await admin(bus, keys, "put", SECRET, SECRET_STRING_VALUE=value)
    await admin(bus, keys, "add-mapping", identity.entity_key, "--secret", SECRET)
    await admin(bus, keys, "destroy", SECRET, "--version", "1")
    assert await admin(bus, keys, "get", SECRET) == value + "\n"
    assert SECRET in await admin(bus, keys, "list")

    host = HostClient(host_nc, NAMES)
    got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
    assert (got.version, got.string_secret) == ("2", value)

    audit = await admin(bus, keys, "audit", "export", "--access")
    kinds = [json.loads(line).get("type") for line in audit.splitlines()]
    assert {"secret_put", "mapping_added", "secret_destroyed", "get"} <= set(kinds), kinds
    stop_backend(backend)

    new = XKey.generate()
    remember(new.seed, "new encryption seed")
    await admin(bus, keys, "rotate-key", NEW_ENCRYPTION_XKEY_SEED=new.seed)
    rotated = Keys(transit=keys.transit, encryption=new)
    await admin(bus, rotated, "rebuild")
    await start_backend(bus, rotated, backends, tmp_path / "run-2.log")
    got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
    assert (got.version, got.string_secret) == ("2", value)
    assert await admin(bus, rotated, "get", SECRET) == value + "\n"

    assert bus.violations() == []


SETUP_USER = "original-setup"  # the original secrets-nats-kv's writer, unrestricted


def start_bus_with_original(make_nats_server: MakeNatsServer) -> tuple[Bus, str]:
    """A bus like `start_bus`, plus one unrestricted user that plays the original backend
    (whose buckets `import` takes over); the roles keep exactly their permissions."""
    passwords = {role: secrets.token_urlsafe(16) for role in NatsRole}
    setup = secrets.token_urlsafe(16)
    credentials = {
        role: f"user: {json.dumps(user_name(role))}, password: {json.dumps(passwords[role])}"
        for role in NatsRole
    }
    conf = render_conf(NAMES, list(NatsRole), credentials)
    users_end = "\n  ]\n}\n"
    assert conf.endswith(users_end)
    extra = f"\n    {{ user: {json.dumps(SETUP_USER)}, password: {json.dumps(setup)} }}"
    conf = conf.removesuffix(users_end) + extra + users_end
    return Bus(make_nats_server(extra_conf=conf), passwords), setup


async def test_import_status_backup_and_restore_work_under_the_admin_permissions(
    make_nats_server: MakeNatsServer, backends: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Take over the original's buckets, check health, back up, restore on another
    server and serve from the restore: the admin user alone, no permission violation."""
    keys = Keys()
    identity = Identity()
    value = f"value-{secrets.token_hex(8)}"
    remember(value, "secret value")
    bus, setup = start_bus_with_original(make_nats_server)
    nc = await connect(
        NatsOptions(servers=(bus.url,), user=SETUP_USER, password=setup),
        name="original",
        persistent=False,
    )
    try:
        original = await Original(nc, keys.encryption, NAMES, remember=remember).create()
        await original.put(SECRET, value)
        await original.set_mapping(identity.entity_key, [SECRET])
    finally:
        await nc.close()

    assert "imported" in await admin(bus, keys, "import")
    await start_backend(bus, keys, backends, tmp_path / "run-1.log")
    async with host_connection(bus) as host_nc:
        host = HostClient(host_nc, NAMES)
        got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
        assert got.string_secret == value
    assert await admin(bus, keys, "put", SECRET, "--string", "second") == (
        f"stored {SECRET} as version 2\n"
    )
    assert "\tok\n" in await admin(bus, keys, "status")
    backup = tmp_path / "backup"
    assert "backed up" in await admin(bus, keys, "backup", "--output", str(backup))
    assert bus.violations() == []

    elsewhere = start_bus(make_nats_server)
    assert "restored" in await admin(elsewhere, keys, "restore", str(backup))
    await start_backend(elsewhere, keys, backends, tmp_path / "run-2.log")
    async with host_connection(elsewhere) as host_nc:
        host = HostClient(host_nc, NAMES)
        got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
        assert (got.version, got.string_secret) == ("2", "second")
    assert "\tok\n" in await admin(elsewhere, keys, "status")
    assert elsewhere.violations() == []

    # A restore that fails after restoring streams removes them again, under the same user.
    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    last = body["streams"][-1]  # restored last: every other stream is in place by then
    last["state"]["messages"] += 1
    (tampered / "manifest.json").write_text(json.dumps({**body, "checksum": _digest(body)}))
    third = start_bus(make_nats_server)
    environment = third.env(NatsRole.ADMIN, keys)
    command = ("restore", str(tampered), *third.flags(NatsRole.ADMIN))
    result = await anyio.to_thread.run_sync(lambda: run_cli(*command, env=environment))
    assert result.returncode == 1
    assert f"restore {last['stream']}: messages is" in result.stderr.decode()
    observer = await connect(third.options(NatsRole.ADMIN), name="observer", persistent=False)
    try:
        for entry in body["streams"]:
            assert await stream_info(observer, entry["stream"], 5.0) is None, entry["stream"]
    finally:
        await observer.close()
    assert third.violations() == []


async def test_an_online_rotation_works_under_the_admin_profile(
    bus: Bus, backends: list[subprocess.Popen[bytes]], host_nc: NATS, tmp_path: Path
) -> None:
    """`rotate-key --online` as the admin: the stats of the backends (precheck, switch), the
    log, staging and access log (re-tagged) with no permission violation."""
    keys, identity, new = Keys(), Identity(), XKey.generate()
    remember(new.seed, "new encryption seed")
    value = f"value-{secrets.token_hex(8)}"
    remember(value, "secret value")
    await start_backend(bus, keys, backends, tmp_path / "run-1.log", next_key=new)
    await admin(bus, keys, "put", SECRET, SECRET_STRING_VALUE=value)
    await admin(bus, keys, "add-mapping", identity.entity_key, "--secret", SECRET)
    host = HostClient(host_nc, NAMES)
    await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())

    said = await admin(bus, keys, "rotate-key", "--online", NEW_ENCRYPTION_XKEY_SEED=new.seed)
    assert said.startswith(f"rotated the encryption key to {new.public_key} online: "), said
    rotated = Keys(transit=keys.transit, encryption=new)
    audit = await admin(bus, rotated, "audit", "export", "--access")
    kinds = [json.loads(line).get("type") for line in audit.splitlines()]
    assert kinds.count("get") == 1, kinds  # the get before the rotation, re-tagged
    got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
    assert (got.version, got.string_secret) == ("1", value)
    assert bus.violations() == []


# --- the host role as an attacker -------------------------------------------------------------


class Attacker:
    """A plain nats-py connection as the host user, noting every error the server sends."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.errors: list[str] = []
        self.nc = NATS()

    async def __aenter__(self) -> Attacker:
        async def noted(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        await self.nc.connect(
            self.bus.url,
            user=user_name(NatsRole.HOST),
            password=self.bus.passwords[NatsRole.HOST],
            error_cb=noted,
            allow_reconnect=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def settled(self) -> None:
        """Once the server has handled everything sent so far: a request it answers in order."""
        await self.nc.request(NAMES.subject("server_xkey"), b"", timeout=10)

    async def refused(self, verb: str, subject: str) -> bool:
        await self.settled()
        needle = f'permissions violation for {verb} to "{subject}"'.lower()
        return any(needle in error for error in self.errors)


async def stream_counts(bus: Bus) -> dict[str, int]:
    nc = await connect(bus.options(NatsRole.ADMIN), name="observer", persistent=False)
    try:
        streams = (
            events_stream(NAMES),
            access_stream(NAMES),
            kv_stream(NAMES.secrets_bucket),
            kv_stream(NAMES.state_bucket),
        )
        return {name: (await stream_state(nc, name, 5.0)).last_seq for name in streams}
    finally:
        await nc.close()


EVENTS = f"wasmcloud_secrets_events.{NAMES.name}"
API = "$JS.API"


async def test_the_backend_role_reads_the_last_entries_a_get_depends_on(
    bus: Bus, backends: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A get behind the log's head asks the leader for the last entry on its subjects
    (`projections.freshness`): the backend's profile allows it, and answers come back."""
    keys = Keys()
    await start_backend(bus, keys, backends, tmp_path / "run.log")
    await admin(bus, keys, "put", SECRET, "--string", "v")
    nc = await connect(bus.options(NatsRole.BACKEND), name="backend-role", persistent=False)
    try:
        log = EventLog(nc, backend_name=NAMES.name, barrier=None)
        secret = secret_subject(log.prefix, SECRET)
        heard = await log.last_reader().read((secret, f"{log.prefix}.key"))
    finally:
        await nc.close()
    assert heard.refused == ""
    assert heard.extra == 0
    assert heard.seqs == {secret: 1}  # the put; nothing on `key` yet
    assert bus.violations() == []


async def test_attacks_from_the_host_role_are_refused_by_the_server(
    bus: Bus, backends: list[subprocess.Popen[bytes]], host_nc: NATS, tmp_path: Path
) -> None:
    keys = Keys()
    identity = Identity()
    await start_backend(bus, keys, backends, tmp_path / "run.log")
    await admin(bus, keys, "put", SECRET, "--string", "v")
    await admin(bus, keys, "add-mapping", identity.entity_key, "--secret", SECRET)
    before = await stream_counts(bus)

    publishes = [
        f"{EVENTS}.secret.{SECRET}",  # forge or replay an event
        f"{EVENTS}.mapping.{identity.entity_key}",
        f"$KV.{NAMES.secrets_bucket}.{SECRET}",  # write a KV entry
        f"$KV.{NAMES.state_bucket}.{identity.entity_key}",
        access_subject(NAMES),  # forge access records
        rotation_lock_subject(NAMES),
        f"{API}.STREAM.PURGE.{events_stream(NAMES)}",
        f"{API}.STREAM.PURGE.{kv_stream(NAMES.secrets_bucket)}",
        f"{API}.STREAM.DELETE.{events_stream(NAMES)}",
        f"{API}.STREAM.MSG.DELETE.{events_stream(NAMES)}",
        f"{API}.STREAM.UPDATE.{access_stream(NAMES)}",
        f"{API}.STREAM.INFO.{events_stream(NAMES)}",
        f"{API}.STREAM.MSG.GET.{events_stream(NAMES)}",  # read the log's entries
        f"{API}.DIRECT.GET.{events_stream(NAMES)}",
        f"{API}.CONSUMER.CREATE.{events_stream(NAMES)}",
        NAMES.subject("put_secret"),  # admin operations are not a host's
        NAMES.subject("add_mapping"),
    ]
    subscribes = [
        (NAMES.subject_prefix + ".>", NAMES.queue_group),  # join the backend's queue group
        (NAMES.subject("server_xkey"), None),  # answer server_xkey
        (NAMES.subject("get"), None),
        (f"{API}.>", None),  # answer (or read) JetStream API requests
        (f"{API}.STREAM.INFO.{events_stream(NAMES)}", None),
        (f"{inbox_prefix(NAMES, NatsRole.BACKEND)}.>", None),  # the backend's replies
        (f"{inbox_prefix(NAMES, NatsRole.ADMIN)}.>", None),
        ("_INBOX_SNKV.>", None),
        (f"{EVENTS}.>", None),
        ("$SRV.PING", None),
        (rotation_lock_subject(NAMES), None),
        (">", None),
    ]
    async with Attacker(bus) as attacker:
        for subject in publishes:
            await attacker.nc.publish(subject, b'{"type":"SecretPut"}', reply="_INBOX.attack")
            assert await attacker.refused("publish", subject), (subject, attacker.errors)
        for subject, queue in subscribes:
            await attacker.nc.subscribe(subject, queue=queue or "")
            assert await attacker.refused("subscription", subject), subject

    assert await stream_counts(bus) == before
    # The backend still serves, and only it: nothing the host tried took part of its traffic.
    host = HostClient(host_nc, NAMES)
    for _ in range(20):
        got = await host.get(SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt())
        assert got.string_secret == "v"


# --- a refusal reads as one ---------------------------------------------------------------


LIMITED_USER = "secrets-limited"
NOTHING = "nothing.allowed"  # an empty allow-list would allow everything


ADMIN_INBOXES = f"{inbox_prefix(NAMES, NatsRole.ADMIN)}.>"
PUT = ("put", SECRET, "--string", "v")


@pytest.mark.parametrize(
    ("command", "allowed", "refused"),
    [
        # May read its replies, may not ask the backend anything.
        (
            PUT,
            {"publish": [NOTHING], "subscribe": [ADMIN_INBOXES]},
            rf"publish to {re.escape(NAMES.subject_prefix)}\.\w+",
        ),
        # May ask, may not read the replies.
        (
            PUT,
            {"publish": [f"{NAMES.subject_prefix}.>"], "subscribe": [NOTHING]},
            rf"subscribe to {re.escape(ADMIN_INBOXES)}",
        ),
        # A JetStream call made by nats-py itself (backup looks the streams up): its
        # timeout is the refusal, the subject as nats-py reports it (lower-cased).
        (
            ("backup", "--output", "unwritten"),
            {"publish": [NOTHING], "subscribe": [ADMIN_INBOXES]},
            r"publish to \$js\.api\.stream\.info\.secrets_nats-kv_events_rotating",
        ),
    ],
    ids=["publish", "subscribe", "nats-py-call"],
)
def test_a_permission_refused_is_reported_as_such_not_as_a_timeout(
    make_nats_server: MakeNatsServer,
    tmp_path: Path,
    command: tuple[str, ...],
    allowed: dict[str, list[str]],
    refused: str,
) -> None:
    """A CLI user without the permission a command needs: one line naming the subject and
    the profile, a non-zero exit, no traceback and no "timed out"."""
    password = secrets.token_urlsafe(16)
    rules = ", ".join(f"{verb}: {{ allow: {json.dumps(s)} }}" for verb, s in allowed.items())
    conf = (
        "authorization { users = [ "
        f"{{ user: {json.dumps(LIMITED_USER)}, password: {json.dumps(password)}, "
        f"permissions: {{ {rules} }} }} ] }}\n"
    )
    server = make_nats_server(extra_conf=conf)
    keys = Keys()
    result = run_cli(
        *(str(tmp_path / arg) if arg == "unwritten" else arg for arg in command),
        "--nats-address",
        server.url,
        "--nats-user",
        LIMITED_USER,
        env=cli_env(keys, NATS_PASSWORD=password),
        timeout=60,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""
    line = (
        rf"secrets-nats-kv: error: NATS refused: permission denied to {refused} "
        r"\(check this user's permissions: secrets-nats-kv nats-permissions\)\n"
    )
    assert re.fullmatch(line, stderr), stderr
