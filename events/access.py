"""The access log: one record per `get` decision, on a stream of its own.

Kept apart from the event log because it is not state: nothing folds it. A record names
who asked for what and the answer, never a value.
"""

from __future__ import annotations

import msgspec

from secrets_nats_kv.errors import SecretsBackendError


def access_stream_name(backend_name: str) -> str:
    return f"SECRETS_{backend_name}_access"


def access_subject(backend_name: str) -> str:
    return f"wasmcloud_secrets_access.{backend_name}"


class AccessRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="get"):
    at: float
    secret: str
    version: str | None = None
    entity: str | None = None
    host: str | None = None
    granted: bool
    error: str | None = None  # the wire error value, as JSON text


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AccessRecord)


class UndecodableAccessRecord(SecretsBackendError):
    """A message on the access stream that is not an access record."""


def encode_access(record: AccessRecord) -> bytes:
    return _encoder.encode(record)


def decode_access(data: bytes) -> AccessRecord:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise UndecodableAccessRecord(f"not an access record: {exc}") from None
