"""`backup --output DIR` and `restore DIR`: everything a backend needs, and nothing secret.

What is kept: the event log (the truth: every write, sealed values, tags), its anchor
(where the chain stood, and the backend's signed audit checkpoints: without it a restored
log could be cut back unnoticed, and `audit verify` would lose what the backend signed),
the access log (who was given what), and the two KV views, each as JetStream's own stream snapshot
(`secrets_nats_kv.nats.snapshot` says why a snapshot and not an export: sequence numbers
must survive, gaps from destroyed entries included). Seeds are never written: they are
not in any stream, and a backup is useless without the encryption key held elsewhere
(README "Key escrow").

A backup folder holds one `ROLE.tar.s2` per stream and `manifest.json`, written last:
the backend's names, per stream its config, state, size and SHA-256, and a SHA-256 over
the manifest itself. Restore checks all of it before sending a byte, refuses a target
that already holds any of these streams, restores the views before the log (so a view is
never ahead of its log), checks each stream's restored state against the manifest, and
removes what it restored if anything fails, so it can simply be re-run.

The views and the anchor are snapshotted before the log, so a backup taken while
backends run has views and an anchor at or behind its log (an anchor ahead of its log
is what a cut-back log looks like, and a backend refuses it); a backend started on the
restore catches the views up and moves the anchor on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv import __version__, config, streams
from secrets_nats_kv.app.arguments import backend_names, nats_options
from secrets_nats_kv.app.session import close as _close
from secrets_nats_kv.app.terminal import plural, progress_printer
from secrets_nats_kv.app.terminal import say as _say
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import ConfigError, StorageError
from secrets_nats_kv.nats import snapshot
from secrets_nats_kv.nats.connection import connect
from secrets_nats_kv.nats.jetstream import to_backend_error

FORMAT = "secrets-nats-kv backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Part:
    """One stream of a backend: its role in the backup and its stream name."""

    role: str
    stream: str
    required: bool

    @property
    def file(self) -> str:
        return f"{self.role}.tar.s2"


def parts(names: BackendNames) -> list[Part]:
    """In snapshot (and restore) order: the views and the anchor before the log they
    follow (each is then at or behind the log, never ahead)."""
    from events.access import access_stream_name
    from events.anchor import anchor_stream_name
    from events.log import stream_name

    return [
        Part("secrets-view", streams.kv_stream(names.secrets_bucket), required=False),
        Part("state-view", streams.kv_stream(names.state_bucket), required=False),
        Part("anchor", anchor_stream_name(names.name), required=False),
        Part("events", stream_name(names.name), required=True),
        Part("access", access_stream_name(names.name), required=False),
    ]


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


async def _exists(nc: NATS, stream: str) -> bool:
    try:
        await nc.jetstream(timeout=5).stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    except nats.errors.Error as exc:
        raise to_backend_error(f"look up {stream}", exc) from None
    return True


def _check_empty(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"backup --output {path}: not an empty folder; give a new one")


# --- backup --------------------------------------------------------------------------------


async def cmd_backup(args: argparse.Namespace) -> int:
    names = backend_names(args)
    out = Path(args.output)
    await anyio.to_thread.run_sync(_check_empty, out)
    nc = await connect(nats_options(args), name="secrets-nats-kv backup", persistent=False)
    try:
        from actors.rotation import staging_stream_name

        if await _exists(nc, staging_stream_name(names.name)):
            raise ConfigError(
                f"backup: a rotate-key run on {names.name} is unfinished; re-run rotate-key "
                "to finish it, then back up"
            )
        present = [part for part in parts(names) if await _exists(nc, part.stream)]
        missing = [p.stream for p in parts(names) if p.required and p not in present]
        if missing:
            raise ConfigError(
                f"backup: no event log {missing[0]} on this NATS: is -n {names.name} right?"
            )
        _check_empty(out)
        await anyio.Path(out).mkdir(mode=0o700, parents=True, exist_ok=True)
        entries = [await _save(nc, part, out) for part in present]
    finally:
        await _close(nc)
    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": f"secrets-nats-kv {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": {
            "name": names.name,
            "subject_base": names.subject_base,
            "secrets_bucket": names.secrets_bucket,
        },
        "streams": entries,
    }
    manifest = {**body, "checksum": _digest(body)}
    pending = out / (MANIFEST + ".partial")
    pending.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(pending, out / MANIFEST)  # the manifest appears only once all else is there
    state = next(e for e in entries if e["role"] == "events")["state"]
    _say(
        f"backed up {names.name} to {out}: {plural(len(entries), 'stream')}, event log "
        f"at sequence {state['last_seq']} ({plural(state['messages'], 'event')})"
    )
    return 0


async def _save(nc: NATS, part: Part, out: Path) -> dict[str, Any]:
    show = progress_printer(f"backup {part.role}", unit="bytes")
    received = [0]
    head, chunks = await snapshot.snapshot(nc, part.stream)
    expected = int(head.get("state", {}).get("bytes", 0))

    def progress(count: int) -> None:
        received[0] += count
        if show is not None:
            show(min(received[0], expected), expected)

    digest = hashlib.sha256()
    size = 0
    target = out / part.file
    with target.open("wb") as handle:
        async for chunk in chunks:
            progress(len(chunk))
            digest.update(chunk)
            handle.write(chunk)
            size += len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    if show is not None:
        show(expected, expected)
    return {
        "role": part.role,
        "stream": part.stream,
        "file": part.file,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "config": head.get("config", {}),
        "state": head.get("state", {}),
    }


# --- restore -------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`, after checking it and every file it names; else one line."""
    damaged = f"restore: {folder} is not a usable backup"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{damaged}: no {MANIFEST} (an unfinished or foreign folder)") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{damaged}: {MANIFEST} is unreadable") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{damaged}: {MANIFEST} is not a secrets-nats-kv backup manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{damaged}: format version {manifest.get('format_version')!r} is unknown"
        )
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if manifest.get("checksum") != _digest(body):
        raise ConfigError(f"{damaged}: {MANIFEST} does not match its checksum (damaged)")
    roles = {entry.get("role") for entry in manifest.get("streams", [])}
    if "events" not in roles:
        raise ConfigError(f"{damaged}: it holds no event log")
    for entry in manifest["streams"]:
        path = folder / str(entry["file"])
        try:
            data = path.read_bytes()
        except OSError:
            raise ConfigError(f"{damaged}: {entry['file']} is missing or unreadable") from None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ConfigError(f"{damaged}: {entry['file']} does not match its checksum (damaged)")
    return manifest


async def cmd_restore(args: argparse.Namespace) -> int:
    folder = Path(args.source)
    manifest = await anyio.to_thread.run_sync(read_manifest, folder)
    name = manifest["backend"]["name"]
    if args.backend_name not in (name, config.DEFAULT_NAME):
        raise ConfigError(
            f"restore: this backup is of backend {name!r}, not {args.backend_name!r}; "
            "stream names cannot change on restore"
        )
    nc = await connect(nats_options(args), name="secrets-nats-kv restore", persistent=False)
    restored: list[str] = []
    try:
        for entry in manifest["streams"]:
            if await _exists(nc, entry["stream"]):
                raise ConfigError(
                    f"restore: {entry['stream']} already exists on this NATS; restore only "
                    "into a NATS that holds none of this backend's streams"
                )
        try:
            for entry in manifest["streams"]:
                restored.append(entry["stream"])  # before: a failed restore may leave it
                await _restore_one(nc, folder, entry, args.replicas)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                for stream in restored:  # leave the target as it was: re-running then works
                    with contextlib.suppress(nats.errors.Error):
                        await nc.jetstream(timeout=5).delete_stream(stream)
            raise
    finally:
        await _close(nc)
    events = next(e for e in manifest["streams"] if e["role"] == "events")
    _say(
        f"restored {name} from {folder}: {plural(len(restored), 'stream')}, event log at "
        f"sequence {events['state']['last_seq']} (backup of {manifest['created_at']}); start "
        "the backends with the same ENCRYPTION_XKEY_SEED and TRANSIT_XKEY_SEED"
    )
    return 0


async def _restore_one(nc: NATS, folder: Path, entry: dict[str, Any], replicas: int | None) -> None:
    stream_config = dict(entry["config"])
    if replicas is not None:
        stream_config["num_replicas"] = replicas
    data = await anyio.Path(folder / entry["file"]).read_bytes()
    show = progress_printer(f"restore {entry['role']}", unit="bytes")
    sent = [0]

    def progress(count: int) -> None:
        sent[0] += count
        if show is not None:
            show(sent[0], len(data))

    reply = await snapshot.restore(
        nc, {"config": stream_config, "state": entry["state"]}, data, on_bytes=progress
    )
    state = reply.get("state", {})
    want = entry["state"]
    keys = ("messages", "first_seq", "last_seq") if want.get("messages") else ("messages",)
    for key in keys:
        if state.get(key) != want.get(key):
            raise StorageError(
                f"restore {entry['stream']}",
                f"{key} is {state.get(key)} after restore, {want.get(key)} in the backup",
            )
