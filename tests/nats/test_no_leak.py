"""Secrets never leak: not to disk, not into any stream, not into logs or CLI output.

The test stores distinctive plaintexts (string and binary) through the real CLI and the
admin client, reads them back every way there is (host gets, CLI gets, list, mappings,
audit export, rebuild), then looks for every plaintext, both seeds and every JWT used,
in everything the system wrote:

- every file under the nats-server's directory, raw bytes;
- every message of every stream, read back through JetStream (payload, headers and
  subject). The KV bucket is S2-compressed on disk, so a raw file scan alone could
  miss a plaintext stored there; reading through the server decodes it;
- the backend processes' logs (debug level, text and JSON) and every CLI output except
  `get`'s stdout, where the value belongs.

Each needle is looked for in the encodings a leak would plausibly take (raw, hex,
base64 at any alignment, a JSON byte array, a Python bytes repr). Control needles
published raw, base64-encoded, into a compressed stream and into headers of scratch
streams prove that the scanner finds what it is looking for.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import api

from events.access import decode_access
from secrets_nats_kv import wire
from secrets_nats_kv.app.client import AdminClient
from secrets_nats_kv.app.natsserver import NatsServer
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import (
    InvalidRequest,
    ProtocolError,
    SecretNotFound,
    Unauthorized,
)
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nkeys import decode_seed
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey
from support.harness import Identity, Keys, cli_env, run_cli, spawn_run
from support.host import HostClient

NAMES = BackendNames()
MakeNatsServer = Callable[..., NatsServer]

# --- the scanner -------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Hit:
    needle: str
    encoding: str
    source: str


def _base64_core(value: bytes, shift: int) -> bytes:
    """The base64 characters that encode `value` alone, when `value` starts `shift` bytes
    (mod 3) into a longer message: the characters whose 6 bits all come from `value`."""
    encoded = base64.b64encode(bytes(shift) + value)
    total = shift + len(value)
    end = (total // 3) * 4 + (0, 1, 2)[total % 3]
    return encoded[(0, 2, 3)[shift] : end]


def encodings(value: bytes) -> dict[str, bytes]:
    """The forms a leaked `value` could take inside a larger text or blob."""
    forms = {
        "raw": value,
        "hex": value.hex().encode(),
        "HEX": value.hex().upper().encode(),
        "json byte array": ",".join(str(b) for b in value).encode(),
        "python list": ", ".join(str(b) for b in value).encode(),
    }
    # A bytes repr quotes with ' unless only ' occurs; inside a larger blob holding both
    # quote characters, the needle's ' comes out escaped.
    quote, text = repr(value)[1], repr(value)[2:-1]
    forms["python bytes repr"] = text.encode()
    escaped = text.replace("'", "\\'") if quote == '"' else text
    forms["python bytes repr, quote escaped"] = escaped.encode()
    for shift in range(3):
        core = _base64_core(value, shift)
        forms[f"base64@{shift}"] = core
        forms[f"base64url@{shift}"] = core.translate(bytes.maketrans(b"+/", b"-_"))
    return forms


def scan(needles: Mapping[str, bytes], sources: Iterable[tuple[str, bytes]]) -> list[Hit]:
    """Every (needle, encoding, source) where an encoding of a needle occurs in a source.

    Needles must be at least 16 bytes, so that a hit is never a coincidence.
    """
    forms = {}
    for label, value in needles.items():
        assert len(value) >= 16, f"needle {label} is too short to scan for"
        forms[label] = encodings(value)
    hits = []
    for source, data in sources:
        for label, by_encoding in forms.items():
            for encoding, pattern in by_encoding.items():
                if pattern in data:
                    hits.append(Hit(label, encoding, source))
    return sorted(set(hits))


def file_sources(root: Path) -> Iterator[tuple[str, bytes]]:
    """Every file under `root`, raw."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield f"file {path.relative_to(root)}", path.read_bytes()


async def stream_sources(nc: NATS) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """Every message of every stream through the JetStream API: subject, headers, payload.

    `$JS.API.STREAM.MSG.GET` returns what the server decoded from its store (S2 or not).
    Also returns how many messages each stream yielded, so the caller can check the
    scan covered what it should.
    """
    names_reply = await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=5)
    names = msgspec.json.decode(names_reply.data)["streams"] or []
    sources: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    for stream in names:
        info = msgspec.json.decode(
            (await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data
        )
        state = info["state"]
        counts[stream] = 0
        for seq in range(state["first_seq"], state["last_seq"] + 1):
            reply = await nc.request(
                f"$JS.API.STREAM.MSG.GET.{stream}", msgspec.json.encode({"seq": seq}), timeout=5
            )
            answer = msgspec.json.decode(reply.data)
            if "message" not in answer:
                continue  # erased or expired
            message = answer["message"]
            where = f"stream {stream}#{seq}"
            sources.append((f"{where} subject", message["subject"].encode()))
            sources.append((f"{where} headers", base64.b64decode(message.get("hdrs", ""))))
            sources.append((f"{where} data", base64.b64decode(message.get("data", ""))))
            counts[stream] += 1
    return sources, counts


@given(
    before=st.binary(max_size=40),
    needle=st.binary(min_size=16, max_size=64),
    after=st.binary(max_size=40),
)
def test_the_scanner_finds_a_needle_in_any_encoding_of_a_larger_blob(
    before: bytes, needle: bytes, after: bytes
) -> None:
    """Whatever surrounds the needle, every encoding of the whole blob gives it away."""
    blob = before + needle + after
    wrapped = {
        "raw": blob,
        "base64": base64.b64encode(blob),
        "base64url": base64.urlsafe_b64encode(blob),
        "hex": blob.hex().encode(),
        "HEX": blob.hex().upper().encode(),
        "json": msgspec.json.encode({"binary_secret": list(blob)}),
        "msgspec bytes": msgspec.json.encode({"sealed": blob}),
        "repr": repr(blob).encode(),
    }
    for name, data in wrapped.items():
        assert scan({"needle": needle}, [(name, data)]), f"missed in {name}"


def test_the_scanner_stays_quiet_without_the_needle() -> None:
    needle = secrets.token_bytes(24)
    unrelated = [(f"blob {n}", os.urandom(4096)) for n in range(8)]
    assert scan({"needle": needle}, unrelated) == []


# --- the system under scan ---------------------------------------------------------------


def canary(label: str) -> str:
    return f"CANARY-{label}-{secrets.token_hex(12)}"


def wait_ready(proc: subprocess.Popen[bytes], log: Path, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while b"backend ready" not in log.read_bytes():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < end, log.read_text()[-2000:]
        time.sleep(0.02)  # poll a condition with a deadline: there is no other signal


@pytest.fixture
def backend_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(15)


@pytest.mark.anyio
async def test_no_plaintext_seed_or_jwt_anywhere(
    make_nats_server: MakeNatsServer,
    tmp_path: Path,
    backend_processes: list[subprocess.Popen[bytes]],
) -> None:
    server: NatsServer = make_nats_server()
    server_dir = server.config.log_file.parent
    logs = tmp_path / "logs"  # scanned: what the system wrote
    private = tmp_path / "private"  # not scanned: the operator's own value files
    logs.mkdir()
    private.mkdir()
    keys = Keys()
    env = cli_env(keys, NATS_ADDRESS=server.url.removeprefix("nats://"))

    for n, log_format in enumerate(("text", "json")):
        log = logs / f"run-{log_format}.log"
        log.touch()
        extra = ("--log-level", "debug", "--log-format", log_format)
        backend_processes.append(spawn_run(server.url, env, *extra, log=log))
        wait_ready(backend_processes[n], log)

    strings = {
        "flag": canary("flag"),
        "env": canary("env"),
        "admin": canary("admin"),
        "rejected-name": canary("rejected-name"),
        "intruder": canary("intruder"),
        "field": canary("field"),
    }
    document = '{"user":"svc","password":"' + strings["field"] + '"}'
    binary = b"\x00\xffBIN" + os.urandom(44)
    reader, stranger = Identity(), Identity.provider()
    tokens = {
        "reader entity": reader.entity_jwt(),
        "reader host": reader.host_jwt(),
        "stranger entity": stranger.entity_jwt(),
        "stranger host": stranger.host_jwt(),
    }
    outputs: list[tuple[str, bytes]] = []
    get_stdouts: list[tuple[str, bytes]] = []

    def cli(*args: str, **extra_env: str) -> bytes:
        result = run_cli(*args, env={**env, **extra_env})
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        label = f"cli {' '.join(args)[:60]}"
        outputs.append((f"{label} stderr", result.stderr))
        if args[0] == "get":
            get_stdouts.append((label, result.stdout))
        else:
            outputs.append((f"{label} stdout", result.stdout))
        return result.stdout

    async def run(*args: str, **extra_env: str) -> bytes:
        return await anyio.to_thread.run_sync(lambda: cli(*args, **extra_env))

    # Writes: the CLI's three ways, the admin client, and requests that must be refused.
    await run("put", "leak-flag", "--string", strings["flag"])
    await run("put", "leak-env", SECRET_STRING_VALUE=strings["env"])
    (private / "value.bin").write_bytes(binary)
    await run("put", "leak-bin", "--binary", str(private / "value.bin"))
    names = ["leak-flag", "leak-env", "leak-bin", "leak-json"]
    await run("add-mapping", reader.entity_key, *[f"--secret={name}" for name in names])
    nc = await connect(NatsOptions(servers=(server.url,)), name="leak test", persistent=False)
    try:
        admin = AdminClient(nc, NAMES, keys.transit)
        await admin.put_secret("leak-json", document)
        await admin.put_secret("leak-flag", strings["admin"])
        with pytest.raises(InvalidRequest):
            await admin.put_secret("not a valid name", strings["rejected-name"])
        with pytest.raises(Unauthorized):
            await AdminClient(nc, NAMES, XKey.generate()).put_secret("leak-x", strings["intruder"])
        await admin.delete("leak-env")
        await admin.undelete("leak-env")

        # Reads through the host path: granted, pinned, a field, refused, malformed.
        host = HostClient(nc, NAMES)
        granted = {"entity_jwt": tokens["reader entity"], "host_jwt": tokens["reader host"]}
        assert (await host.get("leak-flag", **granted)).string_secret == strings["admin"]
        assert (await host.get("leak-flag", version="1", **granted)).string_secret == strings[
            "flag"
        ]
        assert (await host.get("leak-bin", **granted)).binary_secret == list(binary)
        assert (await host.get("leak-env", **granted)).string_secret == strings["env"]
        field = await host.get("leak-json", field="password", **granted)
        assert field.string_secret == strings["field"]
        with pytest.raises(SecretNotFound):
            await host.get("leak-json", field="missing", **granted)
        with pytest.raises(Unauthorized):
            await host.get(
                "leak-flag",
                entity_jwt=tokens["stranger entity"],
                host_jwt=tokens["stranger host"],
            )
        garbage = await nc.request(
            NAMES.subject("get"),
            b"xkv1" + os.urandom(64),
            headers={HOST_XKEY_HEADER: XKey.generate().public_key},
            timeout=5,
        )
        assert b"DecryptionError" in garbage.data
        with pytest.raises(ProtocolError):
            wire.decode_secret_response(garbage.data)
    finally:
        await nc.close()

    # Reads and tools through the CLI.
    assert await run("get", "leak-flag") == strings["admin"].encode() + b"\n"
    assert await run("get", "leak-bin", "--kind", "binary") == binary
    await run("get", "leak-flag", "--secret-version", "1", "--output", str(private / "v1"))
    assert (private / "v1").read_bytes() == strings["flag"].encode()
    await run("list")
    await run("mappings")
    await run("audit", "export")
    await run("audit", "export", "--access", "--output", str(logs / "audit.jsonl"))
    await run("rebuild")
    assert await run("get", "leak-env") == strings["env"].encode() + b"\n"  # after rebuild

    for proc in backend_processes:  # a clean stop: every log line is written
        proc.send_signal(signal.SIGTERM)
    for proc in backend_processes:
        assert await anyio.to_thread.run_sync(proc.wait) == 0

    # Controls: the scanner must find these, and only these.
    controls = {
        "control raw": canary("control-raw"),
        "control base64": canary("control-base64"),
        "control s2": canary("control-s2"),
        "control header": canary("control-header"),
    }
    nc = await connect(NatsOptions(servers=(server.url,)), name="leak test", persistent=False)
    try:
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="LEAKSCAN_CONTROL", subjects=["leakscan.plain"]))
        await js.add_stream(
            api.StreamConfig(
                name="LEAKSCAN_CONTROL_S2",
                subjects=["leakscan.s2"],
                compression=api.StoreCompression.S2,
            )
        )
        await js.publish("leakscan.plain", controls["control raw"].encode())
        await js.publish(
            "leakscan.plain", base64.b64encode(b"x" + controls["control base64"].encode())
        )
        await js.publish("leakscan.s2", controls["control s2"].encode() * 4)
        await js.publish("leakscan.s2", b"", headers={"X-Control": controls["control header"]})
        in_streams, counts = await stream_sources(nc)
    finally:
        await nc.close()
    server.stop()  # flushed: the files are what a restart would read
    in_files = list(file_sources(server_dir))
    in_logs = list(file_sources(logs))

    # The scan read everything it should have.
    assert counts["SECRETS_nats-kv_events"] == 8  # 4 puts, 1 mapping, a put, delete, undelete
    assert counts["KV_WASMCLOUD_SECRETS"] == 7  # every event but the mapping
    assert counts["KV_SECRETS_nats-kv_state"] == 1
    access = [
        data
        for where, data in in_streams
        if where.startswith("stream SECRETS_nats-kv_access#") and where.endswith(" data")
    ]
    assert counts["SECRETS_nats-kv_access"] >= 1
    assert sum(len(decode_access(data)) for data in access if data) >= 7  # the gets above
    assert any(b"backend ready" in data for _, data in in_logs)
    assert any(b'"message": "backend ready"' in data for _, data in in_logs)  # the JSON log

    needles: dict[str, bytes] = {f"value {k}": v.encode() for k, v in strings.items()}
    needles["value binary"] = binary
    needles["value json document"] = document.encode()
    for name, key in (("transit", keys.transit), ("encryption", keys.encryption)):
        needles[f"{name} seed"] = key.seed.encode()
        needles[f"{name} seed raw"] = decode_seed(key.seed)[1]
    for name, token in tokens.items():
        needles[f"jwt {name}"] = token.encode()
        needles[f"jwt {name} signature"] = token.rsplit(".", 1)[1].encode()
    needles.update({k: v.encode() for k, v in controls.items()})

    hits = scan(needles, [*in_streams, *in_files, *in_logs, *outputs])
    leaks = [hit for hit in hits if hit.needle not in controls]
    assert leaks == [], "\n".join(map(str, leaks))

    # The controls were found where they were put (and nowhere else).
    assert all("LEAKSCAN_CONTROL" in hit.source for hit in hits), hits
    found = {
        (hit.needle, hit.source.split("#")[0]) for hit in hits if hit.source.startswith("stream")
    }
    assert found == {
        ("control raw", "stream LEAKSCAN_CONTROL"),
        ("control base64", "stream LEAKSCAN_CONTROL"),
        ("control s2", "stream LEAKSCAN_CONTROL_S2"),
        ("control header", "stream LEAKSCAN_CONTROL_S2"),
    }
    file_hits = {hit.needle for hit in hits if hit.source.startswith("file")}
    assert {"control raw", "control base64"} <= file_hits
    seen_as = {hit.encoding for hit in hits if hit.needle == "control base64"}
    assert "base64@1" in seen_as  # published one byte into a base64-encoded blob
    assert "raw" not in seen_as
    # And the plaintexts were really there to be found: `get` prints them.
    assert scan(needles, get_stdouts), "get printed none of the values scanned for"
