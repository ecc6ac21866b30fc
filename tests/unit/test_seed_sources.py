"""The shell's seed readers: where each looks, what it accepts, and its exact one-line errors.

`audit_signer`, `previous_transit_keys` and `next_encryption_key` each take a seed from
the environment or a file. Every refusal is a `ConfigError` naming the variable, flag,
file or line it came from, and never the seed; these checks pin each message word for
word (the CLI prints it as the whole error) and which source wins when several are set.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from secrets_nats_kv.app import cli
from secrets_nats_kv.app.commands import (
    SeedSource,
    audit_signer,
    next_encryption_key,
    previous_transit_keys,
    seed_from_env,
)
from secrets_nats_kv.errors import ConfigError, InvalidKey
from secrets_nats_kv.nkeys import Role, SigningKey
from secrets_nats_kv.xkeys import XKey
from support.leakcheck import exempt, remembered

BROKEN = "SXnot-a-seed"
ENVIRONMENT = (
    "AUDIT_SIGNING_SEED",
    "AUDIT_SIGNING_SEED_FILE",
    "PREVIOUS_TRANSIT_XKEY_SEEDS",
    "NEXT_ENCRYPTION_XKEY_SEED",
    "TRANSIT_XKEY_SEED",
    "ADMIN_XKEY_SEED",
)


@pytest.fixture(autouse=True)
def no_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def invalid(parse: Callable[[str], object], text: str) -> str:
    """The parser's own words for `text` (the readers put where it came from in front)."""
    with pytest.raises(InvalidKey) as refused:
        parse(text)
    return str(refused.value)


def refusal(read: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as refused:
        read()
    message = str(refused.value)
    assert "\n" not in message
    return message


def seed_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    exempt(path)
    return path


def account_seed() -> SigningKey:
    key = SigningKey.generate(Role.ACCOUNT)
    remembered(key.seed, "audit signing seed")
    return key


def curve_key() -> XKey:
    key = XKey.generate()
    remembered(key.seed, "curve seed")
    return key


def account(text: str) -> SigningKey:
    return SigningKey.from_seed(text, Role.ACCOUNT)


# --- seed_from_env ------------------------------------------------------------------------


def test_the_first_variable_set_is_read_and_a_missing_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin, transit = curve_key(), curve_key()
    assert refusal(lambda: seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED")) == (
        "set ADMIN_XKEY_SEED or TRANSIT_XKEY_SEED to a curve seed (SX…)"
    )
    monkeypatch.setenv("TRANSIT_XKEY_SEED", f" {transit.seed}\n")
    assert seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED").public_key == transit.public_key
    monkeypatch.setenv("ADMIN_XKEY_SEED", admin.seed)
    assert seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED").public_key == admin.public_key
    monkeypatch.setenv("ADMIN_XKEY_SEED", BROKEN)
    message = refusal(lambda: seed_from_env("ADMIN_XKEY_SEED", "TRANSIT_XKEY_SEED"))
    assert message == f"ADMIN_XKEY_SEED: {invalid(XKey.from_seed, BROKEN)}"


# --- audit_signer -------------------------------------------------------------------------


def test_no_audit_seed_is_no_signer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert audit_signer() is None
    monkeypatch.setenv("AUDIT_SIGNING_SEED", "")
    assert audit_signer() is None
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(seed_file(tmp_path, "empty", "")))
    assert audit_signer() is None  # an empty file is no seed, as an empty variable is


def test_the_audit_seed_comes_from_the_variable_before_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from_env, from_file = account_seed(), account_seed()
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(seed_file(tmp_path, "a", from_file.seed)))
    signer = audit_signer()
    assert signer is not None
    assert signer.public_key == from_file.public_key
    monkeypatch.setenv("AUDIT_SIGNING_SEED", f"{from_env.seed}\n")
    signer = audit_signer()
    assert signer is not None
    assert signer.public_key == from_env.public_key
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(tmp_path / "missing"))
    assert audit_signer() is not None  # the variable wins: the file is not even opened


def test_a_bad_audit_seed_is_named_by_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUDIT_SIGNING_SEED", BROKEN)
    assert refusal(audit_signer) == f"AUDIT_SIGNING_SEED: {invalid(account, BROKEN)}"
    monkeypatch.delenv("AUDIT_SIGNING_SEED")
    curve = curve_key().seed  # a seed, but not an account's
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(seed_file(tmp_path, "c", f"{curve}\n")))
    assert refusal(audit_signer) == f"AUDIT_SIGNING_SEED_FILE: {invalid(account, curve)}"
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(seed_file(tmp_path, "blank", "\n")))
    assert refusal(audit_signer) == f"AUDIT_SIGNING_SEED_FILE: {invalid(account, '')}"


def test_an_unreadable_audit_seed_file_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(missing))
    assert refusal(audit_signer) == (
        f"AUDIT_SIGNING_SEED_FILE: cannot read {missing}: No such file or directory"
    )
    binary = seed_file(tmp_path, "binary", b"SA\xff\xfe")
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(binary))
    assert refusal(audit_signer) == f"AUDIT_SIGNING_SEED_FILE: cannot read {binary}: not a seed"
    accented = seed_file(tmp_path, "accented", "SAé")  # UTF-8, but a seed is ASCII
    monkeypatch.setenv("AUDIT_SIGNING_SEED_FILE", str(accented))
    assert refusal(audit_signer) == f"AUDIT_SIGNING_SEED_FILE: cannot read {accented}: not a seed"


# --- previous_transit_keys ----------------------------------------------------------------

PREVIOUS_FLAG = "--previous-transit-xkey-seeds-file"


def run_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", *argv])


def test_previous_transit_keys_come_from_the_variable_then_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first, second, third = curve_key(), curve_key(), curve_key()
    assert previous_transit_keys(run_args()) == ()
    monkeypatch.setenv("PREVIOUS_TRANSIT_XKEY_SEEDS", f" {first.seed} ,, {second.seed},")
    listed = seed_file(tmp_path, "previous", f"# rotated in May\n\n  {third.seed}  \n")
    keys = previous_transit_keys(run_args(PREVIOUS_FLAG, str(listed)))
    assert [k.public_key for k in keys] == [first.public_key, second.public_key, third.public_key]


def test_a_bad_previous_transit_key_is_named_by_its_item_or_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    good = curve_key()
    monkeypatch.setenv("PREVIOUS_TRANSIT_XKEY_SEEDS", f"{good.seed},,{BROKEN}")
    assert refusal(lambda: previous_transit_keys(run_args())) == (
        f"previous transit key (PREVIOUS_TRANSIT_XKEY_SEEDS item 3): "
        f"{invalid(XKey.from_seed, BROKEN)}"
    )
    monkeypatch.delenv("PREVIOUS_TRANSIT_XKEY_SEEDS")
    listed = seed_file(tmp_path, "previous", f"# old\n{good.seed}\n\n  {BROKEN}\n")
    assert refusal(lambda: previous_transit_keys(run_args(PREVIOUS_FLAG, str(listed)))) == (
        f"previous transit key ({listed} line 4): {invalid(XKey.from_seed, BROKEN)}"
    )


# --- next_encryption_key ------------------------------------------------------------------

NEXT_FLAG = "--next-encryption-xkey-seed-file"


def test_the_next_key_comes_from_the_variable_or_the_file_never_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    following = curve_key()
    assert next_encryption_key(run_args()) is None
    monkeypatch.setenv("NEXT_ENCRYPTION_XKEY_SEED", "  \n")
    assert next_encryption_key(run_args()) is None  # blank is unset
    held = seed_file(tmp_path, "next", f"\n{following.seed}\n")
    key = next_encryption_key(run_args(NEXT_FLAG, str(held)))
    assert key is not None
    assert key.public_key == following.public_key
    monkeypatch.setenv("NEXT_ENCRYPTION_XKEY_SEED", following.seed)
    key = next_encryption_key(run_args())
    assert key is not None
    assert key.public_key == following.public_key
    assert refusal(lambda: next_encryption_key(run_args(NEXT_FLAG, str(held)))) == (
        f"give NEXT_ENCRYPTION_XKEY_SEED or {NEXT_FLAG}, not both"
    )


def test_a_bad_next_key_is_named_by_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEXT_ENCRYPTION_XKEY_SEED", f" {BROKEN} ")
    assert refusal(lambda: next_encryption_key(run_args())) == (
        f"NEXT_ENCRYPTION_XKEY_SEED: {invalid(XKey.from_seed, BROKEN)}"
    )
    monkeypatch.delenv("NEXT_ENCRYPTION_XKEY_SEED")
    broken = seed_file(tmp_path, "broken", f"{BROKEN}\n")
    assert refusal(lambda: next_encryption_key(run_args(NEXT_FLAG, str(broken)))) == (
        f"{NEXT_FLAG} {broken}: {invalid(XKey.from_seed, BROKEN)}"
    )
    blank = seed_file(tmp_path, "blank", " \n\n")
    assert refusal(lambda: next_encryption_key(run_args(NEXT_FLAG, str(blank)))) == (
        f"{NEXT_FLAG} {blank}: the file holds no curve seed (SX…)"
    )


# The seed files named by a flag: its reader, and how its refusal names a file at {path}.
FILE_FLAGS: dict[str, tuple[Callable[[argparse.Namespace], object], str]] = {
    PREVIOUS_FLAG: (previous_transit_keys, f"{PREVIOUS_FLAG}: cannot read {{path}}"),
    NEXT_FLAG: (next_encryption_key, f"{NEXT_FLAG} {{path}}: cannot read it"),
}


@pytest.mark.parametrize("flag", sorted(FILE_FLAGS))
def test_an_unreadable_seed_file_is_named(flag: str, tmp_path: Path) -> None:
    read, named = FILE_FLAGS[flag]
    missing = tmp_path / "missing"
    assert refusal(lambda: read(run_args(flag, str(missing)))) == (
        f"{named.format(path=missing)}: No such file or directory"
    )
    binary = seed_file(tmp_path, "binary", b"SX\xff\xfe")
    assert refusal(lambda: read(run_args(flag, str(binary)))) == (
        f"{named.format(path=binary)}: not UTF-8 text"
    )


def test_a_seed_source_never_shows_its_text() -> None:
    seed = curve_key().seed
    assert seed not in repr(SeedSource("NEXT_ENCRYPTION_XKEY_SEED", seed))
