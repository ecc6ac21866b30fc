"""The access log: a record per `get` decision, on a stream of its own.

Kept apart from the event log because it is not state: nothing folds it. A record names
who asked for what and the answer, never a value. Records are stored in batches, one
message for all the decisions an instance made in one turn of its loop: a stored message
per get would cost the server more than the get itself. A lone record (`"type":"get"`)
is read as a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from secrets_nats_kv import streams
from secrets_nats_kv.decoding import DECODE_FAILURES, why_undecodable
from secrets_nats_kv.errors import SecretsBackendError

# The access log's names as its importers spell them; built in `secrets_nats_kv.streams`.
access_stream_name = streams.access_stream
access_subject = streams.access_subject


class AccessRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="get"):
    at: float
    secret: str
    version: str | None = None
    entity: str | None = None
    host: str | None = None
    granted: bool
    error: str | None = None  # the wire error value, as JSON text
    transit_key: str | None = None  # the transit public key the request was sealed to


class AccessBatch(msgspec.Struct, frozen=True, tag_field="type", tag="gets"):
    """Decisions published together, oldest first."""

    records: tuple[AccessRecord, ...]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AccessRecord | AccessBatch)


class UndecodableAccessRecord(SecretsBackendError):
    """A message on the access stream that is not an access record."""


def encode_access(records: Sequence[AccessRecord]) -> bytes:
    """One access-log message holding `records`."""
    return _encoder.encode(AccessBatch(tuple(records)))


def decode_access(data: bytes) -> tuple[AccessRecord, ...]:
    """The records of one access-log message (a batch, or a lone record)."""
    try:
        decoded = _decoder.decode(data)
    except DECODE_FAILURES:
        reason = why_undecodable(data, AccessBatch | AccessRecord)
        raise UndecodableAccessRecord(f"not an access record: {reason}") from None
    return decoded.records if isinstance(decoded, AccessBatch) else (decoded,)
