"""Each mistake an operator can make gets one line saying what was wrong and what to do.

Real CLI processes against a real `run`; every message here was a confusing one before
(JetStream's Go error text, a bare "bad request", a missing name, a misleading variant).
"""

from __future__ import annotations

import os
import pty
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.xkeys import XKey
from support.cliproc import CliBackend, cli_backend, ok, one_line_error
from support.harness import CLI, REPO, run_cli
from support.leakcheck import exempt, remembered


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliBackend]:
    with cli_backend(tmp_path_factory.mktemp("messages")) as running:
        yield running


def value() -> str:
    return remembered(f"msg-{secrets.token_hex(10)}", "secret value")


def put(backend: CliBackend, name: str) -> int:
    return int(ok(run_cli("put", name, "--string", value(), env=backend.env)).split()[-1])


@pytest.mark.parametrize("bad", ["-1", "0", "18446744073709551616", "1.5", "latest"])
def test_pinned_versions_outside_1_to_2_64_minus_1_are_ours_to_refuse(
    backend: CliBackend, bad: str
) -> None:
    line = one_line_error(
        run_cli("get", "msg-v", f"--secret-version={bad}", env=backend.env),
        "--secret-version",
        "1 to 18446744073709551615",
        repr(bad),
    )
    assert "unmarshal" not in line
    assert "bad request" not in line
    one_line_error(run_cli("destroy", "msg-v", f"--version={bad}", env=backend.env), "--version")


def test_undelete_of_a_live_secret_says_it_is_not_deleted(backend: CliBackend) -> None:
    put(backend, "msg-live")
    line = one_line_error(
        run_cli("undelete", "msg-live", env=backend.env), "msg-live", "not deleted"
    )
    assert "SecretRequest" not in line


@pytest.mark.parametrize(
    "args", [("delete",), ("destroy", "--all"), ("destroy", "--version", "3"), ("undelete",)]
)
def test_a_missing_secret_is_named(backend: CliBackend, args: tuple[str, ...]) -> None:
    command, *rest = args
    one_line_error(
        run_cli(command, "msg-never-stored", *rest, env=backend.env),
        "'msg-never-stored'",
        "not found",
    )


def test_a_wrong_encryption_key_says_the_key_may_be_wrong_or_rotated(backend: CliBackend) -> None:
    version = put(backend, "msg-key")
    env = {**backend.env, "ENCRYPTION_XKEY_SEED": remembered(XKey.generate().seed, "seed")}
    one_line_error(
        run_cli("get", "msg-key", env=env),
        "msg-key",
        f"version {version}",
        "key may be wrong",
        "rotate",
    )


@pytest.mark.parametrize(
    "args",
    [
        ("put", "msg-b", "--string", "irrelevant"),
        (
            "add-mapping",
            "MAVCGEGKMVT5UCIDSHJO25VHD2VDNDRA3LIHYH2TPIUQS7JCMS472AFJ",
            "--secret",
            "x",
        ),
        ("list",),
        ("delete", "msg-b"),
    ],
    ids=["put", "add-mapping", "list", "delete"],
)
def test_bucket_flag_on_a_command_the_backend_answers_is_refused(
    backend: CliBackend, args: tuple[str, ...]
) -> None:
    one_line_error(run_cli(*args, "-b", "OTHER", env=backend.env), "-b", "run -b")
    assert "msg-b\t" not in ok(run_cli("list", env=backend.env))


def test_kind_mismatch_is_an_error_either_way(backend: CliBackend, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(remembered(b"\xff\xfe" + os.urandom(30), "secret value"))
    exempt(blob)  # the operator's own input file: the one place the plaintext belongs
    ok(run_cli("put", "msg-bin", "--binary", str(blob), env=backend.env))
    one_line_error(
        run_cli("get", "msg-bin", "--kind", "string", env=backend.env),
        "binary format, but string format was requested",
    )
    assert (
        run_cli("get", "msg-bin", "--kind", "binary", env=backend.env).stdout == blob.read_bytes()
    )


def test_a_binary_secret_is_not_written_to_a_terminal(backend: CliBackend, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(remembered(b"\x00\x01" + os.urandom(30), "secret value"))
    exempt(blob)  # the operator's own input file: the one place the plaintext belongs
    ok(run_cli("put", "msg-tty", "--binary", str(blob), env=backend.env))
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [*CLI, "get", "msg-tty"],
            env=backend.env,
            stdout=terminal,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        written = b""
        try:
            while chunk := os.read(controller, 4096):
                written += chunk
        except OSError:  # EIO: the terminal's other end is closed, all was read
            pass
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 1
    assert written == b""
    stderr = proc.stderr.decode()
    assert stderr.count("\n") == 1
    assert "msg-tty is binary" in stderr
    assert "--output" in stderr


def test_a_client_command_with_no_backend_says_one_is_needed(
    backend: CliBackend, nats_server: NatsServer
) -> None:
    env = {**backend.env, "NATS_ADDRESS": nats_server.url.removeprefix("nats://")}
    for args in (("list",), ("put", "msg-alone", "--string", value())):
        one_line_error(run_cli(*args, env=env), "needs a running backend", "secrets-nats-kv run")


def test_counts_are_in_grammatical_english(backend: CliBackend) -> None:
    put(backend, "msg-one")
    lines = ok(run_cli("list", env=backend.env)).splitlines()
    (line,) = [line for line in lines if line.startswith("msg-one\t")]
    assert "\t1 version\t" in line
    put(backend, "msg-one")
    lines = ok(run_cli("list", env=backend.env)).splitlines()
    (line,) = [line for line in lines if line.startswith("msg-one\t")]
    assert "\t2 versions\t" in line
