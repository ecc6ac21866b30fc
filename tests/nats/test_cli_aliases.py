"""The original's flags and commands, so its scripts run unchanged (README "Migrating").

Every alias is used the way the original's README and `main.rs` use it, against a real
`run` started with the original's short flags (`-e`, `-t`, `-s`, `-n`, `-b`) and no seeds
in its environment: if a flag parsed but did nothing, the commands after it would fail.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest

from secrets_nats_kv import __version__
from secrets_nats_kv.app.cli import SEED_FLAG_WARNING
from secrets_nats_kv.app.workers import child_argv
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.xkeys import XKey
from support.cliproc import CliBackend, ok, one_line_error
from support.harness import Identity, Keys, cli_env, run_cli, spawn_run, wait_until_answering
from support.leakcheck import remembered

NAMES = BackendNames(subject_base="legacy.secrets", name="legacy", secrets_bucket="LEGACY_SECRETS")
WARNING = SEED_FLAG_WARNING + "\n"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliBackend]:
    """`run -e … -t … -s … -n … -b …` as the original's README starts it: seeds as flags."""
    from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig

    directory = tmp_path_factory.mktemp("legacy")
    server = NatsServer(NatsServerConfig.in_dir(directory / "nats", server_name="legacy")).start()
    keys = Keys()
    env = cli_env(None, NATS_ADDRESS=server.url.removeprefix("nats://"))  # no seeds in env
    log = directory / "run.log"
    proc = spawn_run(
        server.url,
        env,
        "-e", keys.encryption.seed,
        "-t", keys.transit.seed,
        "-s", NAMES.subject_base,
        "-n", NAMES.name,
        "-b", NAMES.secrets_bucket,
        log=log,
    )  # fmt: skip
    try:
        anyio.run(wait_until_answering, server.url, NAMES)
        yield CliBackend(server, keys, env, directory)
    finally:
        proc.terminate()
        proc.wait(15)
        server.stop()
    text = log.read_text()
    assert text.count(SEED_FLAG_WARNING) == 1
    assert keys.encryption.seed not in text
    assert keys.transit.seed not in text


def warned_once(result: subprocess.CompletedProcess[bytes], keys: Keys) -> str:
    """stdout of a success whose only stderr is the one seed-flag warning (no seed echoed)."""
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode() == WARNING
    out = result.stdout.decode()
    for seed in (keys.encryption.seed, keys.transit.seed):
        assert seed not in out
    return out


def test_the_originals_put_get_and_mapping_flags_work_end_to_end(legacy: CliBackend) -> None:
    keys, env = legacy.keys, legacy.env
    value = remembered(f"legacy-{secrets.token_hex(8)}", "secret value")
    where = ("-s", NAMES.subject_base, "-n", NAMES.name)
    out = warned_once(
        run_cli("put", "-t", keys.transit.seed, *where, "legacy-a", "--string", value, env=env),
        keys,
    )
    assert out.startswith("stored legacy-a as version ")
    got = run_cli(
        "get", "-e", keys.encryption.seed, "-b", NAMES.secrets_bucket, "legacy-a", env=env
    )
    assert warned_once(got, keys) == value + "\n"
    long_form = run_cli(
        "get",
        "--encryption-xkey-seed", keys.encryption.seed,
        "--secrets-bucket", NAMES.secrets_bucket,
        "legacy-a",
        env=env,
    )  # fmt: skip
    assert warned_once(long_form, keys) == value + "\n"
    entity = Identity().entity_key
    mapped = run_cli(
        "add-mapping", "--transit-xkey-seed", keys.transit.seed, *where, entity,
        "--secret", "legacy-a", "--secret", "legacy-b",
        env=env,
    )  # fmt: skip
    assert warned_once(mapped, keys) == f"{entity} may now read legacy-a, legacy-b\n"
    shown = run_cli("mappings", "-t", keys.transit.seed, *where, entity, env=env)
    assert warned_once(shown, keys) == f"{entity}\tlegacy-a, legacy-b\n"


def test_put_secret_version_is_accepted_and_said_to_be_ignored(legacy: CliBackend) -> None:
    keys = legacy.keys
    env = {**legacy.env, "TRANSIT_XKEY_SEED": keys.transit.seed}
    value = remembered(f"legacy-{secrets.token_hex(8)}", "secret value")
    result = run_cli(
        "put", "-s", NAMES.subject_base, "-n", NAMES.name, "legacy-v", "--string", value,
        "--secret-version", "7",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--secret-version is ignored" in result.stderr.decode()
    assert result.stdout.decode().startswith("stored legacy-v as version ")


def test_the_default_names_do_not_reach_a_backend_renamed_with_short_flags(
    legacy: CliBackend,
) -> None:
    """-s/-n took effect on `run`: without them, nobody answers."""
    env = {**legacy.env, "TRANSIT_XKEY_SEED": legacy.keys.transit.seed}
    one_line_error(run_cli("list", env=env), "no secrets backend answered", "running backend")


def test_version_flags() -> None:
    for flag in ("-V", "--version"):
        assert ok(run_cli(flag, env=cli_env())) == f"secrets-nats-kv {__version__}\n"


@pytest.mark.parametrize("topic", [[], ["get"], ["run"], ["audit", "export"], ["dev"]])
def test_help_command_prints_the_commands_help(topic: list[str]) -> None:
    via_help = ok(run_cli("help", *topic, env=cli_env()))
    via_flag = ok(run_cli(*topic, "--help", env=cli_env()))
    assert via_help == via_flag
    assert via_help.startswith("usage: secrets-nats-kv")


def test_help_of_an_unknown_command_is_one_line() -> None:
    one_line_error(run_cli("help", "frobnicate", env=cli_env()), "frobnicate")


def test_workers_get_seed_flags_through_the_environment_not_their_command_line() -> None:
    seed = XKey.generate().seed
    argv = [
        "run",
        "-e",
        seed,
        f"--transit-xkey-seed={seed}",
        "-t",
        seed,
        "--workers",
        "3",
        "-n",
        "x",
    ]
    child = child_argv(argv)
    assert child == [
        sys.executable,
        "-m",
        "secrets_nats_kv.app.cli",
        "run",
        "-n",
        "x",
        "--workers",
        "1",
    ]
