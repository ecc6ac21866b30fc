"""Test harness for the backend: real backends on real servers, and wasmCloud identities.

`running_backend` runs a `Backend` in-process (same actors as `secrets-nats-kv run`)
against a nats-server started by the conftest fixtures; `spawn_run` runs the real CLI
process, for tests that kill it. `Identity` mints the component and host JWTs a
wasmCloud host would present.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from actors.backend import Backend
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.config import BackendConfig, BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.host import HostClient
from support.leakcheck import RememberingAdminClient, remember, remembered
from support.tokens import mint_component_jwt, mint_host_jwt, mint_provider_jwt

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "secrets_nats_kv.app.cli"]


@dataclass
class Keys:
    """The two backend seeds, fresh per test."""

    transit: XKey = field(default_factory=XKey.generate)
    encryption: XKey = field(default_factory=XKey.generate)

    def __post_init__(self) -> None:
        remember(self.transit.seed, "transit seed")
        remember(self.encryption.seed, "encryption seed")

    def env(self) -> dict[str, str]:
        return {
            "TRANSIT_XKEY_SEED": self.transit.seed,
            "ENCRYPTION_XKEY_SEED": self.encryption.seed,
        }


@dataclass
class Identity:
    """A component (or provider) and the host it runs on, with valid JWTs."""

    account: SigningKey = field(default_factory=lambda: SigningKey.generate(Role.ACCOUNT))
    entity: SigningKey = field(default_factory=lambda: SigningKey.generate(Role.MODULE))
    host: SigningKey = field(default_factory=lambda: SigningKey.generate(Role.SERVER))

    @property
    def entity_key(self) -> str:
        return self.entity.public_key

    def entity_jwt(self, **claims: Any) -> str:
        if self.entity.role is Role.SERVICE:
            token = mint_provider_jwt(self.account, self.entity.public_key, **claims)
        else:
            token = mint_component_jwt(self.account, self.entity.public_key, **claims)
        return remembered(token, "entity JWT")

    def host_jwt(self, **claims: Any) -> str:
        return remembered(mint_host_jwt(self.account, self.host.public_key, **claims), "host JWT")

    @classmethod
    def provider(cls) -> Identity:
        return cls(entity=SigningKey.generate(Role.SERVICE))


@dataclass
class Clients:
    """What a test talks to a running backend with."""

    backend: Backend
    admin: AdminClient
    host: HostClient
    keys: Keys
    names: BackendNames

    async def get(self, identity: Identity, key: str, **kwargs: Any) -> Any:
        return await self.host.get(
            key, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt(), **kwargs
        )

    async def put_readable(self, reader: Identity, name: str, value: str | bytes) -> int:
        """Store `value` as `name` and map `reader` to it (a secret that reader may get):
        the revision the put was given."""
        revision = await self.admin.put_secret(name, value)
        await self.admin.add_mapping(reader.entity_key, [name])
        return revision


def fresh_names() -> BackendNames:
    """Names no other test uses: a backend of its own on a shared server."""
    tag = uuid.uuid4().hex[:12]
    return BackendNames(name=f"t{tag}", secrets_bucket=f"SECRETS_{tag}")


def backend_config(url: str, keys: Keys, **overrides: Any) -> BackendConfig:
    overrides.setdefault("nats", NatsOptions(servers=(url,)))  # or as a user of its own
    return BackendConfig(transit_key=keys.transit, encryption_key=keys.encryption, **overrides)


@contextlib.asynccontextmanager
async def running_backend(
    url: str, keys: Keys | None = None, **overrides: Any
) -> AsyncIterator[Clients]:
    """A backend on `url`, ready, with admin and host clients; stopped on exit."""
    keys = keys or Keys()
    config = backend_config(url, keys, **overrides)
    backend = Backend(config)
    async with anyio.create_task_group() as tg:
        await tg.start(backend.run)
        nc = await connect(config.nats, name="test client", persistent=False)
        try:
            yield Clients(
                backend=backend,
                admin=RememberingAdminClient(nc, config.names, keys.transit),
                host=HostClient(nc, config.names),
                keys=keys,
                names=config.names,
            )
        finally:
            await nc.close()
            backend.stop()


def cli_env(keys: Keys | None = None, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this interpreter's, plus the given keys."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SEED")}
    env["PYTHONPATH"] = str(REPO)
    if keys is not None:
        env.update(keys.env())
    env.update(extra)
    return env


def run_cli(
    *args: str,
    env: Mapping[str, str],
    timeout: float = 30.0,
    input_: bytes | None = None,
    program: Sequence[str] = CLI,
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI (or `program`, a wrapper around it) to completion and capture its output."""
    return subprocess.run(
        [*program, *args],
        env=dict(env),
        capture_output=True,
        timeout=timeout,
        input=input_,
        check=False,
        cwd=REPO,
    )


def backend_flags(url: str, names: BackendNames, *, bucket: bool = False) -> list[str]:
    """`--nats-address URL --name NAME`, for the CLI to reach the backend named; with
    `bucket`, `-b BUCKET` too, for the commands that read its buckets themselves (`run`,
    `import`, `get`): those a backend answers take no `-b`."""
    flags = ["--nats-address", url, "--name", names.name]
    return [*flags, "-b", names.secrets_bucket] if bucket else flags


def spawn_run(url: str, env: Mapping[str, str], *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """`secrets-nats-kv run` as a real process (logs to `log`), for kill/restart tests."""
    handle = log.open("ab")
    try:
        return subprocess.Popen(
            [*CLI, "run", "--nats-address", url, *extra],
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    finally:
        handle.close()


async def wait_until_answering(
    server: str | NatsOptions, names: BackendNames | None = None, deadline: float = 20.0
) -> None:
    """Wait until some backend answers `server_xkey` at `server` (a URL, or the options of an
    authenticated connection); TimeoutError after `deadline` seconds."""
    names = names or BackendNames()
    options = NatsOptions(servers=(server,)) if isinstance(server, str) else server
    nc = await connect(options, name="probe", persistent=False)
    try:
        with anyio.fail_after(deadline):
            while True:
                try:
                    msg = await nc.request(names.subject("server_xkey"), b"", timeout=0.5)
                    if msg.data.startswith(b"X"):
                        return
                except Exception:
                    pass
                await anyio.sleep(0.05)  # poll a condition with a deadline, not a fixed wait
    finally:
        await nc.close()


def bind_request(operation: str, body: bytes) -> bytes:
    """An admin body bound to its subject, as `AdminClient` sends it: an authenticated JSON
    object (one with a `request_id`) without `operation` gets the subject's operation and,
    for `add_mapping.X` / `remove_mapping.X`, `entity` X. Anything else is left as it is
    (the original's forms, and bodies a test breaks on purpose)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(document, dict) or "request_id" not in document or "operation" in document:
        return body
    name, _, argument = operation.partition(".")
    document["operation"] = name
    if argument and name in ("add_mapping", "remove_mapping"):
        document.setdefault("entity", argument)
    return json.dumps(document).encode()
