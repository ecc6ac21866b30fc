"""The access log follows the key: every batch tagged by the old key is tagged again.

Access batches carry a tag over (stream, batch id, body) from the encryption key
(`actors.access_log`), which `audit export --access` checks: left under the old key,
every batch before a rotation would be counted as forged by an export under the new
key, and the old key would still verify tags on the server. Nothing seals them (they
hold no values), and nothing folds them, so the batch need not keep its position:
each one the old key tagged is published again, the same body under a batch id derived
from the old one and the new key, tagged by the new key, and only then deleted. The
derived id makes a re-run harmless: JetStream drops a repeat inside its duplicate
window and the export counts a batch id once.

Runs once the live log is swapped, before staging is dropped, so a crash re-runs it.
Online, a backend that has not switched yet may still tag a batch with the old key:
passes repeat until one finds nothing (a bounded number of times).
"""

from __future__ import annotations

import nats.errors

from actors.rotation.context import API_TIMEOUT, RotationRun
from events.access import access_stream_name, access_subject
from secrets_nats_kv.barrier import KV_TAG_HEADER
from secrets_nats_kv.nats.jetstream import (
    MSG_ID_HEADER,
    erase_message,
    stream_info,
    to_backend_error,
)
from secrets_nats_kv.nats.reader import stream_messages

RETAG_PASSES = 3


def retagged_id(batch_id: str, new_key: str) -> str:
    """The batch id of a batch tagged again for `new_key` (deterministic: see above)."""
    return f"{batch_id}.{new_key[-8:]}"


async def retag_access_log(run: RotationRun) -> int:
    """Tag every access batch the old key tagged for the new key; how many were moved."""
    stream = access_stream_name(run.names.name)
    subject = access_subject(run.names.name)
    if run.old.public_key == run.new.public_key:
        return 0  # a resumed run given only the new key: nothing old can be recognised
    if await stream_info(run.nc, stream, API_TIMEOUT) is None:
        return 0  # no access log (run --no-access-log)
    js = run.nc.jetstream(timeout=API_TIMEOUT)
    moved = 0
    for _ in range(RETAG_PASSES):
        found = 0
        async for message in stream_messages(run.nc, stream, subject):
            headers = message.headers or {}
            batch_id = headers.get(MSG_ID_HEADER, "")
            tag = headers.get(KV_TAG_HEADER)
            if not batch_id or not run.old_auth.verify_kv(stream, batch_id, 0, message.data, tag):
                continue
            new_id = retagged_id(batch_id, run.new.public_key)
            new_tag = run.new_auth.kv_tag(stream, new_id, 0, message.data)
            try:
                await js.publish(
                    subject,
                    message.data,
                    stream=stream,
                    headers={MSG_ID_HEADER: new_id, KV_TAG_HEADER: new_tag},
                )
            except nats.errors.Error as exc:
                raise to_backend_error(f"re-tag {stream} #{message.seq}", exc) from None
            await erase_message(run.nc, stream, message.seq, API_TIMEOUT)
            found += 1
        moved += found
        if found == 0:
            break
    return moved
