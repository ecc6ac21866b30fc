"""Secured NATS: every way an operator locks NATS down works end to end, and a refusal is
one clear line that never repeats a password, seed or JWT.

Each kind of security gets a real nats-server configured for it: nkey users, an operator
(decentralised JWT) setup with a `.creds` file, user/password, TLS with a private CA, and
mutual TLS. For each, a real `run` process serves, and the CLI's `put`, `add-mapping`
and `get` and a host's `get` go through the same secured NATS; flags are used for some
commands and the environment variables for others, so both spellings are covered. Then
the same commands without (or with wrong) credentials must fail in one line that says
why, and nothing any process printed may contain the secret material.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import Role, SigningKey, verify
from support.harness import Identity, Keys, cli_env, run_cli, spawn_run, wait_until_answering
from support.host import HostClient

if TYPE_CHECKING:
    from conftest import MakeNatsServer, NkeyAuthServer

pytestmark = pytest.mark.anyio

NAMES = BackendNames()
SECRET = "db-password"
OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Access:
    """One way to reach a secured server: as CLI flags, as environment, as NatsOptions."""

    url: str
    flags: tuple[str, ...] = ()  # the credentials as flags...
    env: dict[str, str] = field(default_factory=dict)  # ...and as environment variables
    always: dict[str, str] = field(default_factory=dict)  # environment for both forms
    options: NatsOptions = field(default_factory=NatsOptions)
    secrets: tuple[str, ...] = ()  # texts no output may ever contain


@dataclass(frozen=True)
class Refusal:
    """Credentials the server must refuse, and what the one-line error must say."""

    label: str
    access: Access
    says: str


@dataclass(frozen=True)
class Secured:
    good: Access
    refusals: tuple[Refusal, ...]


# --- operator mode: NATS JWTs and a .creds file -------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def nats_jwt(issuer: SigningKey, subject: str, name: str, nats: dict[str, object]) -> str:
    """A NATS JWT v2, as nats-io/jwt encodes it, signed by `issuer`.

    `jti` is base32 (no padding) of SHA-512/256 over the claims without it, as the Go
    library computes it; the server only needs it to be unique.
    """
    claims: dict[str, object] = {
        "iat": int(time.time()),
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode())
    claims["jti"] = base64.b32encode(digest.digest()).decode().rstrip("=")
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64url(signature)}"


ACCOUNT_LIMITS = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
# An account gets JetStream only when its JWT grants storage.
JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
USER_CLAIMS = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}


def account_jwt(operator: SigningKey, account: SigningKey, name: str, jetstream: bool) -> str:
    limits = {**ACCOUNT_LIMITS, **(JETSTREAM_LIMITS if jetstream else {})}
    nats = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}}
    return nats_jwt(operator, account.public_key, name, {**nats, "type": "account", "version": 2})


def write_creds(path: Path, account: SigningKey, name: str) -> tuple[str, str]:
    """A fresh user of `account` in the standard .creds format (0600); its JWT and seed."""
    user = SigningKey.generate(Role.USER)
    token = nats_jwt(account, user.public_key, name, {**USER_CLAIMS, "type": "user", "version": 2})
    text = (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text)
    return token, user.seed


def operator_conf(operator: SigningKey, system: SigningKey, accounts: dict[str, str]) -> str:
    """Server config for an operator with a memory resolver preloaded with `accounts`."""
    claims: dict[str, object] = {"type": "operator", "version": 2}
    preload = "\n".join(f"  {key}: {token}" for key, token in accounts.items())
    return (
        f"operator: {nats_jwt(operator, operator.public_key, 'test-operator', claims)}\n"
        f"system_account: {system.public_key}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{preload}\n}}"
    )


# --- TLS material -----------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "leaf.cnf").write_text(
        "subjectAltName = IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=secrets-nats-kv test CA", cwd=directory)  # fmt: skip
    for leaf in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                "-subj", f"/CN={leaf}", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "1",
                "-extfile", "leaf.cnf", cwd=directory)  # fmt: skip
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def key_body(path: Path) -> str:
    """The base64 body of a PEM private key: what must never be printed."""
    return "".join(line for line in path.read_text().splitlines() if "-----" not in line)


# --- one secured server per kind ------------------------------------------------------------


def nkey_secured(auth: NkeyAuthServer) -> Secured:
    url = auth.server.url
    seed_file = str(auth.seed_file)
    seed = auth.seed_file.read_text().strip()
    good = Access(
        url,
        flags=("--nats-nkey-seed-file", seed_file),
        env={"NATS_NKEY_SEED_FILE": seed_file},
        options=NatsOptions(servers=(url,), nkey_seed_file=seed_file),
        secrets=(seed,),
    )
    return Secured(good, (Refusal("no nkey", Access(url), "refused our credentials"),))


def creds_secured(make_nats_server: MakeNatsServer, directory: Path) -> Secured:
    directory.mkdir(parents=True)
    operator = SigningKey.generate(Role.OPERATOR)
    system = SigningKey.generate(Role.ACCOUNT)
    account = SigningKey.generate(Role.ACCOUNT)
    stranger = SigningKey.generate(Role.ACCOUNT)  # an account this operator never signed
    conf = operator_conf(
        operator,
        system,
        {
            account.public_key: account_jwt(operator, account, "secrets", jetstream=True),
            system.public_key: account_jwt(operator, system, "SYS", jetstream=False),
        },
    )
    url = make_nats_server(extra_conf=conf).url
    creds = directory / "backend.creds"
    token, seed = write_creds(creds, account, "secrets-nats-kv")
    foreign = directory / "foreign.creds"
    foreign_token, foreign_seed = write_creds(foreign, stranger, "intruder")
    good = Access(
        url,
        flags=("--nats-creds-file", str(creds)),
        env={"NATS_CREDSFILE": str(creds)},
        options=NatsOptions(servers=(url,), creds_file=str(creds)),
        secrets=(token, seed, foreign_token, foreign_seed),
    )
    return Secured(
        good,
        (
            Refusal("no creds", Access(url), "refused our credentials"),
            Refusal(
                "creds of an unknown account",
                Access(url, flags=("--nats-creds-file", str(foreign))),
                "refused our credentials",
            ),
        ),
    )


def password_secured(make_nats_server: MakeNatsServer) -> Secured:
    password = secrets.token_urlsafe(18)
    wrong = secrets.token_urlsafe(18)
    conf = (
        "authorization {\n"
        f'  users = [ {{ user: "backend", password: {json.dumps(password)} }} ]\n'
        "}"
    )
    url = make_nats_server(extra_conf=conf).url
    hostport = url.removeprefix("nats://")
    good = Access(
        url,
        flags=("--nats-user", "backend"),
        env={"NATS_USER": "backend"},
        always={"NATS_PASSWORD": password},
        options=NatsOptions(servers=(url,), user="backend", password=password),
        secrets=(password, wrong),
    )
    return Secured(
        good,
        (
            Refusal("no password", Access(url), "refused our credentials"),
            Refusal(
                "wrong password",
                Access(url, flags=("--nats-user", "backend"), always={"NATS_PASSWORD": wrong}),
                "refused our credentials",
            ),
            # Credentials in the address: the error names the server, not the password.
            Refusal(
                "wrong password in the address",
                Access(f"backend:{wrong}@{hostport}"),
                "refused our credentials",
            ),
        ),
    )


def tls_secured(make_nats_server: MakeNatsServer, pki: Pki, *, mutual: bool) -> Secured:
    block = [f"  cert_file: {json.dumps(str(pki.server_cert))}"]
    block.append(f"  key_file: {json.dumps(str(pki.server_key))}")
    if mutual:
        block += [f"  ca_file: {json.dumps(str(pki.ca))}", "  verify: true"]
    url = make_nats_server(extra_conf="tls {\n" + "\n".join(block) + "\n}").url
    flags: tuple[str, ...] = ("--tls-ca", str(pki.ca))
    env = {"NATS_TLS_CA": str(pki.ca)}
    options = NatsOptions(servers=(url,), tls_ca=str(pki.ca))
    if mutual:
        flags += ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        env.update(NATS_TLS_CERT=str(pki.client_cert), NATS_TLS_KEY=str(pki.client_key))
        options = replace(options, tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    good = Access(
        url,
        flags=flags,
        env=env,
        options=options,
        secrets=(key_body(pki.client_key), key_body(pki.server_key)),
    )
    if mutual:
        refusal = Refusal(
            "no client certificate", Access(url, flags=("--tls-ca", str(pki.ca))), "NATS at"
        )
    else:
        refusal = Refusal("no CA", Access(url), "TLS handshake with NATS at")
    return Secured(good, (refusal,))


KINDS = ("nkey", "creds", "password", "tls", "mutual-tls")


@pytest.fixture(params=KINDS)
def secured(
    request: pytest.FixtureRequest, make_nats_server: MakeNatsServer, tmp_path: Path
) -> Secured:
    kind: str = request.param
    if kind == "nkey":
        auth: NkeyAuthServer = request.getfixturevalue("nkey_auth_server")
        return nkey_secured(auth)
    if kind == "creds":
        return creds_secured(make_nats_server, tmp_path / "creds")
    if kind == "password":
        return password_secured(make_nats_server)
    if OPENSSL is None:
        if os.environ.get("CI") == "true":  # CI must run every TLS test, never skip them
            pytest.fail("the openssl CLI makes the test CA, and CI has none: install openssl")
        pytest.skip("the openssl CLI makes the test CA")
    return tls_secured(make_nats_server, make_pki(tmp_path / "pki"), mutual=kind == "mutual-tls")


# --- running things -----------------------------------------------------------------------


class Outputs:
    """Everything the processes of one test printed, for the leak scan."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def cli(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        result = run_cli(*args, env=env)
        self.texts += [result.stdout.decode(errors="replace"), result.stderr.decode("utf-8")]
        return result

    def scan(self, *secret_texts: str) -> None:
        for text in self.texts:
            for secret_text in secret_texts:
                assert secret_text not in text, "secret material in a process's output"


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(15)


# --- the tests --------------------------------------------------------------------------------


async def test_backend_serves_over_secured_nats(
    secured: Secured, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """`run`, `put`, `add-mapping`, `get` and a host's get, all through the secured NATS."""
    good = secured.good
    keys = Keys()
    env = cli_env(keys, **good.always)
    log = tmp_path / "run.log"
    processes.append(spawn_run(good.url, env, *good.flags, log=log))
    try:
        await wait_until_answering(good.options, NAMES)
    except TimeoutError:
        raise AssertionError(f"no backend answered; see {log}") from None

    outputs = Outputs()
    value = f"value-{secrets.token_hex(8)}"
    identity = Identity()
    address = ("--nats-address", good.url)
    # put with flags, add-mapping and get with the environment variables.
    put = outputs.cli(
        "put", SECRET, *address, *good.flags, env={**env, "SECRET_STRING_VALUE": value}
    )
    assert put.returncode == 0, put.stderr
    assert put.stdout.decode() == f"stored {SECRET} as version 1\n"
    env_form = {**env, **good.env}
    mapped = outputs.cli("add-mapping", identity.entity_key, "--secret", SECRET, *address,
                         env=env_form)  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr
    got = outputs.cli("get", SECRET, *address, env=env_form)
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode() == value + "\n"

    nc = await connect(good.options, name="host", persistent=False)
    try:
        secret = await HostClient(nc, NAMES).get(
            SECRET, entity_jwt=identity.entity_jwt(), host_jwt=identity.host_jwt()
        )
    finally:
        await nc.close()
    assert (secret.version, secret.string_secret) == ("1", value)

    assert stop(processes[0]) == 0
    outputs.texts.append(log.read_text())
    outputs.scan(*good.secrets, keys.transit.seed, keys.encryption.seed)


async def test_client_commands_without_credentials_fail_in_one_line(
    secured: Secured, tmp_path: Path
) -> None:
    """A refused `put` or `get` says why in one line, and shows no secret."""
    keys = Keys()
    outputs = Outputs()
    for refusal in secured.refusals:
        bad = refusal.access
        env = cli_env(keys, **bad.env, **bad.always)
        for command in (("put", SECRET, "--string", "x"), ("get", SECRET)):
            result = outputs.cli(*command, "--nats-address", bad.url, *bad.flags, env=env)
            assert result.returncode == 1, (refusal.label, result.stderr)
            assert result.stdout == b""
            line = one_line(result)
            assert line.startswith("secrets-nats-kv: error: "), line
            assert refusal.says in line, (refusal.label, line)
    outputs.scan(*secured.good.secrets)


async def test_run_without_credentials_stops_in_one_line(secured: Secured) -> None:
    """`run` refused by NATS exits non-zero with the reason, instead of retrying forever."""
    keys = Keys()
    outputs = Outputs()
    for refusal in secured.refusals:
        bad = refusal.access
        env = cli_env(keys, **bad.env, **bad.always)
        started = time.monotonic()
        result = outputs.cli(
            "run", "--log-level", "error", "--nats-address", bad.url, *bad.flags, env=env
        )
        assert result.returncode == 1, (refusal.label, result.stderr)
        assert time.monotonic() - started < 15
        line = one_line(result)
        assert line.startswith("secrets-nats-kv: error: "), line
        assert refusal.says in line, (refusal.label, line)
    outputs.scan(*secured.good.secrets)


def test_operator_jwts_verify_like_nats_does() -> None:
    """The minted JWTs are what nats-server checks: header, issuer, signature, jti."""
    operator = SigningKey.generate(Role.OPERATOR)
    account = SigningKey.generate(Role.ACCOUNT)
    token = account_jwt(operator, account, "secrets", jetstream=True)
    header, body, signature = token.split(".")
    assert json.loads(_unb64url(header)) == {"typ": "JWT", "alg": "ed25519-nkey"}
    claims = json.loads(_unb64url(body))
    assert (claims["iss"], claims["sub"]) == (operator.public_key, account.public_key)
    assert claims["nats"]["limits"]["disk_storage"] == -1
    assert verify(operator.public_key, f"{header}.{body}".encode(), _unb64url(signature))
    jti = claims.pop("jti")
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode())
    assert jti == base64.b32encode(digest.digest()).decode().rstrip("=")
