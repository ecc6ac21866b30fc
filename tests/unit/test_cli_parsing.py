"""The CLI's own parsing: version numbers, --help defaults, the original's aliases (no server)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secrets_nats_kv.app import cli
from secrets_nats_kv.app.commands import next_encryption_key
from secrets_nats_kv.xkeys import XKey
from support.leakcheck import exempt

MAX = 2**64 - 1


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_a_version_is_accepted_exactly_when_it_is_1_to_2_64_minus_1(number: int) -> None:
    if 1 <= number <= MAX:
        assert cli.version_number(str(number)) == number
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="1 to 18446744073709551615"):
            cli.version_number(str(number))


@given(st.text(max_size=12))
def test_a_version_that_is_not_a_whole_number_is_refused_in_our_words(text: str) -> None:
    stripped = text.strip()
    if stripped.isascii() and stripped.isdigit() and 1 <= int(stripped) <= MAX:
        assert cli.version_number(text) == int(stripped)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="whole number"):
            cli.version_number(text)


def help_of(*command: str) -> str:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            target = action.choices[command[0]]
            for word in command[1:]:
                for sub in target._actions:
                    if isinstance(sub, argparse._SubParsersAction):
                        target = sub.choices[word]
            return " ".join(target.format_help().split())
    raise AssertionError("no subcommands")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (("run",), "(default: 64)"),
        (("run",), "(default: wasmcloud.secrets)"),
        (("run",), "(default: nats-kv)"),
        (("run",), "(default: 127.0.0.1:4222)"),
        (("get",), "(default: WASMCLOUD_SECRETS)"),
        (("dev",), "(default: .secrets-nats-kv)"),
        (("run",), "(default: wasmcloud_secrets)"),
    ],
)
def test_help_shows_defaults(command: tuple[str, ...], shown: str) -> None:
    assert shown in help_of(*command)


def test_help_never_shows_a_password_or_seed_taken_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATS_PASSWORD", "pw-4f1e9c")
    for command in ("run", "put", "get"):
        assert "pw-4f1e9c" not in help_of(command)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["run", "-s", "a.b"], "subject_base", "a.b"),
        (["run", "-n", "other"], "backend_name", "other"),
        (["run", "-b", "BUCKET"], "secrets_bucket", "BUCKET"),
        (["run", "-e", "SXE"], "encryption_xkey_seed", "SXE"),
        (["run", "-t", "SXT"], "transit_xkey_seed", "SXT"),
        (["put", "x", "-t", "SXT", "--string", "v"], "transit_xkey_seed", "SXT"),
        (["put", "x", "--string", "v", "--secret-version", "3"], "secret_version", "3"),
        (["get", "x", "-e", "SXE"], "encryption_xkey_seed", "SXE"),
        (["get", "x", "--kind", "binary"], "kind", "binary"),
        (["add-mapping", "MX", "-s", "a.b", "--secret", "s"], "subject_base", "a.b"),
        (["remove-mapping", "MX", "--secret", "s", "--secret", "t"], "secret", ["s", "t"]),
        (["put", "x", "--string", "v", "-b", "OTHER"], "refused_bucket", "OTHER"),
    ],
)
def test_the_originals_flags_parse(argv: list[str], dest: str, value: object) -> None:
    assert getattr(cli.build_parser().parse_args(argv), dest) == value


@pytest.mark.parametrize("command", [["run"], ["dev"]])
def test_run_and_dev_take_the_next_encryption_key_from_a_file(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    following = XKey.generate()
    seed_file = tmp_path / "next.seed"
    seed_file.write_text(f"{following.seed}\n")
    exempt(seed_file)
    monkeypatch.delenv("NEXT_ENCRYPTION_XKEY_SEED", raising=False)
    flag = "--next-encryption-xkey-seed-file"
    args = cli.build_parser().parse_args([*command, flag, str(seed_file)])
    key = next_encryption_key(args)
    assert key is not None
    assert key.public_key == following.public_key
    assert next_encryption_key(cli.build_parser().parse_args(command)) is None
    monkeypatch.setenv("NEXT_ENCRYPTION_XKEY_SEED", following.seed)
    from_env = next_encryption_key(cli.build_parser().parse_args(command))
    assert from_env is not None
    assert from_env.public_key == following.public_key
