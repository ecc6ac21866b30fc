"""The secrets protocol on the wire: its two headers, and its messages to and from bytes.

The messages themselves are `secrets_nats_kv.messages` (re-exported here, so the rest
of the code imports the protocol from one place). Decoding is on every request's hot
path, hence msgspec and module-level encoder/decoder instances. Every decoder turns a
malformed message into the project's own error class (never a msgspec or json
exception), so a responder can answer with the wire error that class stands for.
"""

from __future__ import annotations

from typing import Literal, TypeVar, overload

import msgspec

from secrets_nats_kv.decoding import DECODE_FAILURES, why_undecodable
from secrets_nats_kv.errors import (
    InvalidPayload,
    InvalidRequest,
    NoSecretProvided,
    ProtocolError,
    protocol_error_from_wire,
)
from secrets_nats_kv.messages import (
    AdminPutSecretRequest,
    AdminRequest,
    Application,
    Byte,
    ChangeReply,
    Context,
    LifecycleReply,
    ListReply,
    MappingRequest,
    MappingsReply,
    PutSecretRequest,
    PutSecretResponse,
    RequestId,
    Secret,
    SecretListing,
    SecretRequest,
    SecretResponse,
    UInt,
    WireError,
    put_error_from_wire,
)

__all__ = [
    "AdminPutSecretRequest",
    "AdminRequest",
    "Application",
    "Byte",
    "ChangeReply",
    "Context",
    "LifecycleReply",
    "ListReply",
    "MappingRequest",
    "MappingsReply",
    "PutSecretRequest",
    "PutSecretResponse",
    "RequestId",
    "Secret",
    "SecretListing",
    "SecretRequest",
    "SecretResponse",
    "UInt",
    "WireError",
    "decode_admin_request",
    "decode_lifecycle_reply",
    "decode_mapping_request",
    "decode_put_request",
    "decode_put_response",
    "decode_secret_request",
    "decode_secret_response",
    "encode_admin_request",
    "encode_error_response",
    "encode_mapping_request",
    "encode_put_request",
    "encode_put_response",
    "encode_reply",
    "encode_secret_request",
    "encode_secret_response",
    "put_error_from_wire",
]

HOST_XKEY_HEADER = "WasmCloud-Host-Xkey"
"""The header carrying the xkey a host (or admin) sealed its request with."""
RESPONSE_XKEY_HEADER = "Server-Response-Xkey"
"""The header carrying the one-off xkey the backend sealed its reply with."""


def encode_reply(reply: ListReply | MappingsReply | ChangeReply) -> bytes:
    return _encoder.encode(reply)


_T = TypeVar("_T")


def _decode(
    decoder: msgspec.json.Decoder[_T], data: bytes, error: type[ProtocolError], what: str
) -> _T:
    """Decode `data`, or raise `error` saying it is not `what` (never msgspec's own errors)."""
    try:
        return decoder.decode(data)
    except DECODE_FAILURES:
        raise error(f"not {what}: {why_undecodable(data, decoder.type)}") from None


def decode_lifecycle_reply(data: bytes, reply_type: type[LifecycleReply]) -> LifecycleReply:
    """A lifecycle reply of `reply_type`, or raise the error it carries / `InvalidPayload`."""
    try:
        value = msgspec.json.decode(data)
    except DECODE_FAILURES:
        reason = why_undecodable(data, reply_type)
        raise InvalidPayload(f"not a {reply_type.__name__}: {reason}") from None
    if isinstance(value, dict) and "error" in value:
        raise protocol_error_from_wire(value["error"])
    try:
        return msgspec.convert(value, reply_type)
    except DECODE_FAILURES:
        reason = why_undecodable(data, reply_type)
        raise InvalidPayload(f"not a {reply_type.__name__}: {reason}") from None


# --- encoders and decoders ----------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_secret_request_decoder = msgspec.json.Decoder(SecretRequest)
_secret_response_decoder = msgspec.json.Decoder(SecretResponse)
_put_request_decoder = msgspec.json.Decoder(PutSecretRequest)
_admin_put_request_decoder = msgspec.json.Decoder(AdminPutSecretRequest)
_put_response_decoder = msgspec.json.Decoder(PutSecretResponse)
_mapping_request_decoder = msgspec.json.Decoder(MappingRequest)
_mapping_list_decoder = msgspec.json.Decoder(list[str])
_admin_request_decoder = msgspec.json.Decoder(AdminRequest)


def encode_secret_request(req: SecretRequest) -> bytes:
    """The JSON a host seals for `get` (used by our client and tests)."""
    return _encoder.encode(req)


def decode_secret_request(data: bytes) -> SecretRequest:
    """Parse an opened `get` body; anything else is `InvalidRequest` (PROTOCOL.md §3)."""
    return _decode(_secret_request_decoder, data, InvalidRequest, "a SecretRequest")


def encode_secret_response(secret: Secret) -> bytes:
    """`{"secret": {...}}`, the body the responder seals back to the host."""
    return _encoder.encode(SecretResponse(secret=secret))


def encode_error_response(err: ProtocolError) -> bytes:
    """`{"error": E}`, the plain reply of a failed `get`."""
    return _encoder.encode(SecretResponse(error=err.wire()))


def decode_secret_response(data: bytes) -> Secret:
    """The secret a `get` reply carries, or raise the error it carries.

    A reply that is not a SecretResponse, or has neither a secret nor an error, is
    `InvalidPayload`.  If a reply had both, the error wins: a client must not use a
    secret from a reply that also says the request failed.
    """
    response = _decode(_secret_response_decoder, data, InvalidPayload, "a SecretResponse")
    if response.error is not None:
        raise protocol_error_from_wire(response.error)
    if response.secret is None:
        raise InvalidPayload("the reply carries neither a secret nor an error")
    return response.secret


def encode_put_request(req: PutSecretRequest) -> bytes:
    """Either form of the `put_secret` body (an `AdminPutSecretRequest` is one too)."""
    return _encoder.encode(req)


@overload
def decode_put_request(data: bytes, *, authenticated: Literal[True]) -> AdminPutSecretRequest: ...
@overload
def decode_put_request(data: bytes, *, authenticated: Literal[False]) -> PutSecretRequest: ...
@overload
def decode_put_request(data: bytes, *, authenticated: bool) -> PutSecretRequest: ...
def decode_put_request(data: bytes, *, authenticated: bool) -> PutSecretRequest:
    """Parse an opened `put_secret` body, in the admin form if `authenticated`.

    Raises `InvalidRequest` on a bad shape and `NoSecretProvided` unless exactly one of
    `string_secret` and `binary_secret` is non-null.
    """
    req: PutSecretRequest
    if authenticated:
        req = _decode(_admin_put_request_decoder, data, InvalidRequest, "an AdminPutSecretRequest")
    else:
        req = _decode(_put_request_decoder, data, InvalidRequest, "a PutSecretRequest")
    if (req.string_secret is None) == (req.binary_secret is None):
        raise NoSecretProvided()
    return req


def encode_put_response(revision: int, error: ProtocolError | None = None) -> bytes:
    """`{"revision":N,"error":null}`, or revision 0 and the error's variant name."""
    if error is not None:
        return _encoder.encode(PutSecretResponse(0, error.variant))
    return _encoder.encode(PutSecretResponse(revision))


def decode_put_response(data: bytes) -> PutSecretResponse:
    """Parse a `put_secret` reply; one that is not a PutSecretResponse is `InvalidPayload`."""
    return _decode(_put_response_decoder, data, InvalidPayload, "a PutSecretResponse")


def encode_mapping_request(req: MappingRequest | list[str]) -> bytes:
    """The `add_mapping`/`remove_mapping` body: the admin form, or the original's bare list."""
    return _encoder.encode(req)


@overload
def decode_mapping_request(data: bytes, *, authenticated: Literal[True]) -> MappingRequest: ...
@overload
def decode_mapping_request(data: bytes, *, authenticated: Literal[False]) -> list[str]: ...
@overload
def decode_mapping_request(data: bytes, *, authenticated: bool) -> MappingRequest | list[str]: ...
def decode_mapping_request(data: bytes, *, authenticated: bool) -> MappingRequest | list[str]:
    """Parse a mapping body; a bad shape or an empty list of secrets is `InvalidRequest`."""
    req: MappingRequest | list[str]
    if authenticated:
        req = _decode(_mapping_request_decoder, data, InvalidRequest, "a MappingRequest")
    else:
        req = _decode(_mapping_list_decoder, data, InvalidRequest, "a JSON array of secret names")
    names = req.secrets if isinstance(req, MappingRequest) else req
    if not names:
        raise InvalidRequest("no secrets given")
    return req


def encode_admin_request(req: AdminRequest) -> bytes:
    """The JSON an admin seals for a lifecycle operation."""
    return _encoder.encode(req)


def decode_admin_request(data: bytes) -> AdminRequest:
    """Parse an opened lifecycle request; a bad shape is `InvalidRequest`."""
    return _decode(_admin_request_decoder, data, InvalidRequest, "an AdminRequest")
