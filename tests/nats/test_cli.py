"""The CLI end to end: real `secrets-nats-kv` processes against a real backend and server.

What an operator types is the product's surface: every command's happy path prints what
it did (and only `get` prints a value), and every failure an operator can cause ends as
exactly one `secrets-nats-kv: error: …` line saying what is wrong, with nothing on stdout
and no traceback. Every CLI run in this module goes through `cli()`, which also checks
that no secret value or seed shows up where it must not.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from secrets_nats_kv import __version__
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import Unauthorized
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.xkeys import XKey
from support.cliproc import CliBackend, cli_backend, ok, one_line_error
from support.harness import Identity, cli_env, run_cli, spawn_run, wait_until_answering
from support.host import HostClient

# Every value this module stores, and every seed it hands a CLI process: none may appear
# in any CLI output except `get`'s stdout (and `keys gen`, whose job is to print a seed).
KNOWN_SECRETS: set[bytes] = set()


def note_secret(value: str | bytes) -> str | bytes:
    KNOWN_SECRETS.add(value.encode() if isinstance(value, str) else value)
    return value


def secret_text(label: str) -> str:
    return str(note_secret(f"{label}-{secrets.token_hex(12)}"))


def secret_bytes() -> bytes:
    # Starts with bytes that are not UTF-8, so a text round trip would show.
    value = b"\xff\xfe\x00" + os.urandom(45)
    note_secret(value)
    return value


def cli(
    *args: str, env: dict[str, str], timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI and check that nothing secret leaked into what it printed."""
    result = run_cli(*args, env=env, timeout=timeout)
    forbidden = set(KNOWN_SECRETS)
    forbidden.update(v.encode() for k, v in env.items() if k.endswith("_SEED") and v)
    forbidden.update(v.encode() for k, v in env.items() if k == "SECRET_STRING_VALUE" and v)
    stdout_may_hold_value = args[:1] == ("get",)
    for needle in forbidden:
        assert needle not in result.stderr, f"{args[0]} printed a secret on stderr"
        if not stdout_may_hold_value:
            assert needle not in result.stdout, f"{args[0]} printed a secret on stdout"
    return result


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliBackend]:
    """One server and one real `run` process for the whole module (each test uses its own
    secret names), so the CLI runs, not the setup, dominate the module's time."""
    with cli_backend(tmp_path_factory.mktemp("cli")) as backend:
        yield backend


# --- happy paths ---------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = cli("--version", env=cli_env())
    assert ok(result) == f"secrets-nats-kv {__version__}\n"


def test_put_string_by_flag_and_env_then_get_each_version(backend: CliBackend) -> None:
    first, second = secret_text("flag"), secret_text("env")
    out = ok(cli("put", "cli-string", "--string", first, env=backend.env))
    assert out.startswith("stored cli-string as version ")
    v1 = int(out.split()[-1])
    env = {**backend.env, "SECRET_STRING_VALUE": second}
    v2 = int(ok(cli("put", "cli-string", env=env)).split()[-1])
    assert v2 > v1

    assert cli("get", "cli-string", env=backend.env).stdout == second.encode() + b"\n"
    pinned = cli("get", "cli-string", "--secret-version", str(v1), env=backend.env)
    assert pinned.returncode == 0
    assert pinned.stderr == b""
    assert pinned.stdout == first.encode() + b"\n"
    as_string = cli("get", "cli-string", "--kind", "string", env=backend.env)
    assert as_string.stdout == second.encode() + b"\n"
    # As in the original: asking for the other kind is an error, not a reinterpretation.
    one_line_error(
        cli("get", "cli-string", "--kind", "binary", env=backend.env),
        "string format, but binary format was requested",
    )


def test_put_binary_by_flag_and_env_then_get_raw_bytes_and_to_a_file(
    backend: CliBackend, tmp_path: Path
) -> None:
    first, second = secret_bytes(), secret_bytes()
    (tmp_path / "first.bin").write_bytes(first)
    (tmp_path / "second.bin").write_bytes(second)
    out = ok(cli("put", "cli-binary", "--binary", str(tmp_path / "first.bin"), env=backend.env))
    v1 = int(out.split()[-1])
    env = {**backend.env, "SECRET_BINARY_FILE": str(tmp_path / "second.bin")}
    v2 = int(ok(cli("put", "cli-binary", env=env)).split()[-1])
    assert v2 > v1

    latest = cli("get", "cli-binary", "--kind", "binary", env=backend.env)
    assert latest.returncode == 0
    assert latest.stderr == b""
    assert latest.stdout == second
    pinned = cli(
        "get", "cli-binary", "--secret-version", str(v1), "--kind", "binary", env=backend.env
    )
    assert pinned.stdout == first

    target = tmp_path / "out.bin"
    out = ok(cli("get", "cli-binary", "--output", str(target), env=backend.env))
    assert target.read_bytes() == second
    assert out == f"wrote {len(second)} bytes of cli-binary version {v2} to {target}\n"


@pytest.mark.anyio
async def test_mapping_commands_grant_show_and_revoke(backend: CliBackend) -> None:
    who = Identity()
    env = backend.env
    ok(cli("put", "cli-map-a", "--string", secret_text("a"), env=env))
    ok(cli("put", "cli-map-b", "--string", secret_text("b"), env=env))

    out = ok(
        cli(
            "add-mapping", who.entity_key, "--secret", "cli-map-a", "--secret", "cli-map-b", env=env
        )
    )
    assert out == f"{who.entity_key} may now read cli-map-a, cli-map-b\n"
    assert f"{who.entity_key}\tcli-map-a, cli-map-b\n" in ok(cli("mappings", env=env))
    shown = ok(cli("mappings", who.entity_key, env=env))
    assert shown == f"{who.entity_key}\tcli-map-a, cli-map-b\n"

    nc = await connect(NatsOptions(servers=(backend.server.url,)), name="t", persistent=False)
    try:
        host = HostClient(nc, BackendNames())
        jwts = {"entity_jwt": who.entity_jwt(), "host_jwt": who.host_jwt()}
        assert (await host.get("cli-map-b", **jwts)).string_secret is not None

        out = ok(cli("remove-mapping", who.entity_key, "--secret", "cli-map-b", env=env))
        assert out == f"{who.entity_key} may no longer read cli-map-b\n"
        assert ok(cli("mappings", who.entity_key, env=env)) == f"{who.entity_key}\tcli-map-a\n"
        with pytest.raises(Unauthorized):
            await host.get("cli-map-b", **jwts)
        assert (await host.get("cli-map-a", **jwts)).string_secret is not None
    finally:
        await nc.close()

    stranger = Identity().entity_key
    assert ok(cli("mappings", stranger, env=env)) == "no mappings\n"


def test_lifecycle_commands_one_happy_path_each(backend: CliBackend) -> None:
    env = backend.env
    old, new = secret_text("old"), secret_text("new")
    v1 = int(ok(cli("put", "cli-life", "--string", old, env=env)).split()[-1])
    v2 = int(ok(cli("put", "cli-life", "--string", new, env=env)).split()[-1])

    listing = ok(cli("list", env=env))
    (line,) = [row for row in listing.splitlines() if row.startswith("cli-life\t")]
    assert line.split("\t")[1:3] == [f"version {v2}", "2 versions"]

    out = ok(cli("delete", "cli-life", env=env))
    assert out.startswith("deleted cli-life (revision ")
    one_line_error(cli("get", "cli-life", env=env), "cli-life", "not found")
    out = ok(cli("undelete", "cli-life", env=env))
    assert out.startswith("restored cli-life as version ")
    assert cli("get", "cli-life", env=env).stdout == new.encode() + b"\n"

    out = ok(cli("destroy", "cli-life", "--version", str(v1), env=env))
    assert out == f"destroyed cli-life revision {v1}: their bytes are erased\n"
    one_line_error(
        cli("get", "cli-life", "--secret-version", str(v1), env=env), "cli-life", "not found"
    )
    assert cli("get", "cli-life", env=env).stdout == new.encode() + b"\n"

    only = int(ok(cli("put", "cli-shred", "--string", secret_text("shred"), env=env)).split()[-1])
    out = ok(cli("destroy", "cli-shred", "--all", env=env))
    assert out == f"destroyed cli-shred revision {only}: their bytes are erased\n"
    one_line_error(cli("get", "cli-shred", env=env), "cli-shred", "not found")


def test_keys_gen_prints_export_lines_with_matching_public_keys() -> None:
    """Lines to paste (or `eval`): `export NAME=SEED  # public key X…`, fresh each time."""
    seeds = []
    for args in (("keys", "gen"), ("keys", "gen", "NEW_ENCRYPTION_XKEY_SEED")):
        result = run_cli(*args, env=cli_env())  # prints a seed by design
        lines = ok(result).splitlines()
        names = list(args[2:]) or ["TRANSIT_XKEY_SEED", "ENCRYPTION_XKEY_SEED"]
        assert len(lines) == len(names)
        for name, line in zip(names, lines, strict=True):
            assignment, _, comment = line.partition("  # public key ")
            assert assignment.startswith(f"export {name}=SX")
            seed = assignment.removeprefix(f"export {name}=")
            assert XKey.from_seed(seed).public_key == comment
            seeds.append(seed)
        shell = subprocess.run(
            ["sh", "-c", f"{result.stdout.decode()}\necho ${names[-1]}"],
            capture_output=True,
            check=True,
        )
        assert shell.stdout.decode().strip() == seeds[-1]  # the lines paste as they are
    assert len(set(seeds)) == len(seeds)
    one_line_error(run_cli("keys", "gen", "1BAD", env=cli_env()), "1BAD", "variable name")


# --- failures: one line, says what is wrong ------------------------------------------------


def test_missing_credentials_file(backend: CliBackend, tmp_path: Path) -> None:
    missing = tmp_path / "nope.creds"
    env = {**backend.env, "NATS_CREDSFILE": str(missing)}
    value = secret_text("creds")
    one_line_error(cli("put", "cli-x", "--string", value, env=env), "credentials", str(missing))
    one_line_error(cli("get", "cli-x", env=env), "credentials", str(missing))


def test_nats_unreachable(backend: CliBackend) -> None:
    """A port we hold bound but never listen on: refused, and nobody else can take it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        env = {**backend.env, "NATS_ADDRESS": address}
        one_line_error(
            cli("put", "cli-x", "--string", secret_text("down"), env=env), "cannot reach", address
        )


def test_backend_not_answering(backend: CliBackend, nats_server: NatsServer) -> None:
    """A server that is up, with no backend on it: every admin command says so at once."""
    env = {**backend.env, "NATS_ADDRESS": nats_server.url.removeprefix("nats://")}
    for args in (("put", "cli-x", "--string", secret_text("alone")), ("list",)):
        one_line_error(cli(*args, env=env), "no secrets backend answered", "nats-kv")


def test_wrong_admin_key_is_unauthorized_and_names_the_key(backend: CliBackend) -> None:
    stranger = XKey.generate()
    env = {**backend.env, "TRANSIT_XKEY_SEED": stranger.seed}
    value = secret_text("intruder")
    for args in (
        ("put", "cli-intruder", "--string", value),
        ("add-mapping", Identity().entity_key, "--secret", "cli-intruder"),
        ("list",),
    ):
        one_line_error(cli(*args, env=env), "Unauthorized", stranger.public_key)
    assert "cli-intruder" not in ok(cli("list", env=backend.env))


@pytest.mark.parametrize(
    "args",
    [
        ("put", "bad name", "--string", "irrelevant"),
        ("get", "bad name"),
        ("delete", "bad..name"),
        (
            "add-mapping",
            "MAVCGEGKMVT5UCIDSHJO25VHD2VDNDRA3LIHYH2TPIUQS7JCMS472AFJ",
            "--secret",
            "a b",
        ),
    ],
    ids=["put", "get", "delete", "add-mapping"],
)
def test_bad_secret_name(backend: CliBackend, args: tuple[str, ...]) -> None:
    one_line_error(cli(*args, env=backend.env), "invalid secret name")


@pytest.mark.parametrize(
    "args",
    [
        ("add-mapping", "MBAD", "--secret", "a"),
        ("remove-mapping", XKey.generate().public_key, "--secret", "a"),  # a curve key, not M/V
        ("mappings", "not-a-key"),
    ],
    ids=["short", "wrong-role", "mappings"],
)
def test_bad_pubkey(backend: CliBackend, args: tuple[str, ...]) -> None:
    one_line_error(cli(*args, env=backend.env), "PUBKEY", "invalid key")


def test_missing_seed_variables(backend: CliBackend) -> None:
    without_transit = {k: v for k, v in backend.env.items() if k != "TRANSIT_XKEY_SEED"}
    one_line_error(
        cli("put", "cli-x", "--string", secret_text("noseed"), env=without_transit),
        "TRANSIT_XKEY_SEED",
    )
    without_encryption = {k: v for k, v in backend.env.items() if k != "ENCRYPTION_XKEY_SEED"}
    one_line_error(cli("get", "cli-x", env=without_encryption), "ENCRYPTION_XKEY_SEED")
    not_a_seed = {**backend.env, "ENCRYPTION_XKEY_SEED": "SXNOTASEED"}
    one_line_error(cli("get", "cli-x", env=not_a_seed), "ENCRYPTION_XKEY_SEED")


def test_missing_value(backend: CliBackend, tmp_path: Path) -> None:
    one_line_error(cli("put", "cli-x", env=backend.env), "--string", "SECRET_STRING_VALUE")
    one_line_error(cli("put", "cli-x", "--string", env=backend.env), "put", "--string")
    missing = tmp_path / "absent.bin"
    one_line_error(cli("put", "cli-x", "--binary", str(missing), env=backend.env), str(missing))
    both = {
        **backend.env,
        "SECRET_STRING_VALUE": secret_text("both"),
        "SECRET_BINARY_FILE": str(missing),
    }
    one_line_error(cli("put", "cli-x", env=both), "SECRET_STRING_VALUE", "SECRET_BINARY_FILE")
    one_line_error(cli("destroy", "cli-x", env=backend.env), "destroy", "--version", "--all")
    assert "cli-x\t" not in ok(cli("list", env=backend.env))


# --- admin keys: the transit key, --admin-xkey, ADMIN_XKEYS (several), ADMIN_XKEY_SEED ------


def test_admin_keys_from_the_flag_and_the_environment_may_write_others_may_not(
    backend: CliBackend,
) -> None:
    """A backend started with `--admin-xkey A` and `ADMIN_XKEYS=B,C` takes writes signed by
    A, B or C (the CLI signs with `ADMIN_XKEY_SEED`), and by its transit key; any other
    key is refused, by name, and nothing it sent is stored."""
    flag_key, env_keys, stranger = (
        XKey.generate(),
        [XKey.generate(), XKey.generate()],
        XKey.generate(),
    )
    run_names = ("--name", "cliadmin", "-b", "CLIADMIN_SECRETS")
    names = ("--name", "cliadmin")  # clients pick the backend; its bucket is its own
    run_env = {**backend.env, "ADMIN_XKEYS": ",".join(k.public_key for k in env_keys)}
    url = backend.server.url
    proc = spawn_run(
        url, run_env, *run_names, "--admin-xkey", flag_key.public_key,
        log=backend.directory / "run-admin-keys.log",
    )  # fmt: skip
    try:
        anyio.run(
            wait_until_answering,
            url,
            BackendNames(name="cliadmin", secrets_bucket="CLIADMIN_SECRETS"),
        )
        signers = {"flag": flag_key, "env 1": env_keys[0], "env 2": env_keys[1]}
        for label, key in signers.items():
            env = {**backend.env, "ADMIN_XKEY_SEED": key.seed}
            name = f"cli-admin-{label.replace(' ', '')}"
            stored = ok(cli("put", name, "--string", secret_text(label), *names, env=env))
            assert stored.startswith(f"stored {name} as version "), stored
        transit = cli(
            "put", "cli-admin-transit", "--string", secret_text("t"), *names, env=backend.env
        )
        assert ok(transit).startswith("stored cli-admin-transit as version ")
        refused = {**backend.env, "ADMIN_XKEY_SEED": stranger.seed}
        one_line_error(
            cli("put", "cli-admin-stranger", "--string", secret_text("s"), *names, env=refused),
            "Unauthorized",
            stranger.public_key,
        )
        listed = ok(cli("list", *names, env=backend.env))
        for label in signers:
            assert f"cli-admin-{label.replace(' ', '')}" in listed
        assert "cli-admin-transit" in listed
        assert "cli-admin-stranger" not in listed
        # The default backend on the same server knows none of these keys.
        default = {**backend.env, "ADMIN_XKEY_SEED": flag_key.seed}
        one_line_error(cli("list", env=default), "Unauthorized", flag_key.public_key)
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_malformed_admin_xkey_stops_run_with_one_line(backend: CliBackend) -> None:
    for extra, env in (
        (("--admin-xkey", "not-a-key"), backend.env),
        ((), {**backend.env, "ADMIN_XKEYS": f"{XKey.generate().public_key},SBADKEY"}),
    ):
        result = cli("run", "--nats-address", backend.server.url, *extra, env=env)
        one_line_error(result, "--admin-xkey")
