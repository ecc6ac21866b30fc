"""The README's commands are the ones the code and CI actually run.

A reader copies the README's first command to try the project and its second to test
it; CI promises to run exactly that second command. These checks keep the three from
drifting apart.
"""

from __future__ import annotations

import re
import shlex

import pytest

from secrets_nats_kv import config
from secrets_nats_kv.app import cli
from support.harness import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S)


def test_first_block_installs_and_starts_dev() -> None:
    first = bash_blocks()[0].strip()
    assert "\n" not in first  # one line to paste
    steps = [step.strip() for step in first.split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    assert steps[-1] == ".venv/bin/secrets-nats-kv dev"
    args = cli.build_parser().parse_args(["dev"])
    assert args.data_dir == ".secrets-nats-kv"  # the README's ./.secrets-nats-kv/
    assert args.nats_address == config.DEFAULT_NATS_ADDRESS == "127.0.0.1:4222"
    assert "./.secrets-nats-kv/" in README


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = bash_blocks()[1].strip()
    assert command.endswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines()


# Lint, format and types: CI runs them as a step after the tests (not as tests, so the
# unit tier stays fast), and fails if any of them fails.
STATIC_CHECKS = ["ruff check", "ruff format --check", "mypy", "mypy bench"]


def test_ci_runs_every_static_check_after_the_tests() -> None:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    tests_at = lines.index(bash_blocks()[1].strip())
    start = lines.index("checks=(")
    end = lines.index(")", start)
    checks = [shlex.split(line)[0].removesuffix(" --no-cache .") for line in lines[start + 1 : end]]
    assert tests_at < start
    assert checks == STATIC_CHECKS
    assert any("-m $check" in line for line in lines[end:])  # each one run, in a loop


def readme_invocations() -> list[list[str]]:
    """Every `secrets-nats-kv …` command line in the README's bash blocks, as argv."""
    found = []
    for block in bash_blocks():
        for line in block.splitlines():
            for step in line.split("&&"):
                words = shlex.split(step, comments=True)
                for i, word in enumerate(words):
                    if word.endswith("secrets-nats-kv"):
                        found.append(words[i + 1 :])
    return found


@pytest.mark.parametrize("argv", readme_invocations(), ids=lambda argv: " ".join(argv)[:40])
def test_every_readme_command_parses(argv: list[str]) -> None:
    cli.build_parser().parse_args(argv)
