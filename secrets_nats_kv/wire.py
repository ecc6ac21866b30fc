"""The JSON messages of the secrets protocol (PROTOCOL.md §3, §5) as msgspec structs.

Field order is the order of the JSON the original sends, so that encoding what we decoded
gives back the same bytes.  Decoding is on every request's hot path, hence msgspec and
module-level encoder/decoder instances.  Every decoder turns a malformed message into the
project's own error class (never a msgspec or json exception), so a responder can answer
with the wire error that class stands for.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias, TypeVar, overload

import msgspec

from secrets_nats_kv.decoding import DECODE_FAILURES, why_undecodable
from secrets_nats_kv.errors import (
    TEXT_VARIANTS,
    InvalidPayload,
    InvalidRequest,
    NoSecretProvided,
    ProtocolError,
    RotationInProgress,
    SecretTooLarge,
    protocol_error_from_wire,
)

__all__ = [
    "AdminPutSecretRequest",
    "AdminRequest",
    "Application",
    "Byte",
    "ChangeReply",
    "Context",
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

Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
"""One element of a `binary_secret`: the original sends bytes as a JSON array of 0..255."""

WireError: TypeAlias = str | dict[str, str]
"""serde's external tagging of `GetSecretError`: a bare string or a one-key object."""

RequestId = Annotated[str, msgspec.Meta(min_length=1)]
"""Becomes the `Nats-Msg-Id` of an append; an empty one would defeat deduplication."""

_U64_MAX = 2**64 - 1
UInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""Revisions and timestamps: `u64` in the original, capped at `i64::MAX` here because
msgspec cannot bound beyond int64 (no revision or timestamp comes near it)."""

_REDACTED = "<redacted>"

HOST_XKEY_HEADER = "WasmCloud-Host-Xkey"
"""The header carrying the xkey a host (or admin) sealed its request with."""
RESPONSE_XKEY_HEADER = "Server-Response-Xkey"
"""The header carrying the one-off xkey the backend sealed its reply with."""


# --- get ----------------------------------------------------------------------------------


class Application(msgspec.Struct, frozen=True, gc=False):
    """The application a secret is read for; `policy` is JSON text or ""."""

    name: str | None = None
    policy: str = ""


class Context(msgspec.Struct, frozen=True, gc=False):
    """Who asks: the entity's and the host's JWTs, checked by the responder, not here."""

    entity_jwt: str
    host_jwt: str
    application: Application = msgspec.field(default_factory=Application)

    def __repr__(self) -> str:
        # JWTs are bearer credentials for the protocol: keep them out of logs.
        return (
            f"Context(entity_jwt={_REDACTED}, host_jwt={_REDACTED}, "
            f"application={self.application!r})"
        )


class SecretRequest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The sealed body of a `get`.  `version` stays text: PROTOCOL §3 checks it late."""

    key: str
    field: str | None = None
    version: str | None = None
    context: Context

    def requested_revision(self) -> int | None:
        """The revision `version` names (None: latest), parsed as Rust's `u64::from_str`.

        Raises `InvalidRequest` if it is not an unsigned 64-bit integer.  A method rather
        than a decode-time check because the original checks it only after the JWTs and
        the mapping (PROTOCOL.md §3), and the order decides which error the host sees.
        """
        if self.version is None:
            return None
        text = self.version
        digits = text[1:] if text.startswith("+") else text
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidRequest("version is not an unsigned integer")
        significant = digits.lstrip("0")
        # Length first: int() of a very long digit string is slow (and refused past 4300).
        if len(significant) > 20 or int(significant or "0") > _U64_MAX:
            raise InvalidRequest("version is larger than an unsigned 64-bit integer")
        return int(significant or "0")


class Secret(msgspec.Struct, frozen=True, gc=False):
    """A secret value at a version; exactly one of the two value fields is set."""

    version: str
    string_secret: str | None = None
    binary_secret: list[Byte] | None = None

    def __post_init__(self) -> None:
        # Runs on decode too, where msgspec turns the ValueError into a ValidationError.
        if (self.string_secret is None) == (self.binary_secret is None):
            raise ValueError("exactly one of string_secret and binary_secret must be set")

    @classmethod
    def of_bytes(cls, version: str, data: bytes) -> Secret:
        """A binary secret (sent as a JSON array of byte values)."""
        return cls(version, binary_secret=list(data))

    @classmethod
    def of_string(cls, version: str, text: str) -> Secret:
        """A string secret."""
        return cls(version, string_secret=text)

    def value_bytes(self) -> bytes:
        """The value as bytes, whichever form it has (strings as UTF-8)."""
        if self.binary_secret is not None:
            return bytes(self.binary_secret)
        assert self.string_secret is not None  # guaranteed by __post_init__
        return self.string_secret.encode()

    def __repr__(self) -> str:
        kind = "string" if self.string_secret is not None else "binary"
        return f"Secret(version={self.version!r}, {kind}_secret={_REDACTED})"


class SecretResponse(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """The reply to a `get`: `{"secret": {...}}` on success, `{"error": E}` on failure."""

    secret: Secret | None = None
    error: WireError | None = None


# --- put_secret ---------------------------------------------------------------------------


class PutSecretRequest(msgspec.Struct, frozen=True):
    """The original's unauthenticated `put_secret` body; all four keys are always sent."""

    key: str
    version: str = ""
    string_secret: str | None = None
    binary_secret: list[Byte] | None = None

    def value_bytes(self) -> bytes:
        """The value as bytes, whichever form it has (strings as UTF-8)."""
        if self.binary_secret is not None:
            return bytes(self.binary_secret)
        if self.string_secret is not None:
            return self.string_secret.encode()
        raise NoSecretProvided()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(key={self.key!r}, version={self.version!r}, "
            f"string_secret={_redact(self.string_secret)}, "
            f"binary_secret={_redact(self.binary_secret)})"
        )


class AdminPutSecretRequest(PutSecretRequest, frozen=True, kw_only=True):
    """`put_secret` as sealed by an admin key: the original's body plus replay protection,
    and the operation it is for (inside the seal, so a copy cannot be re-aimed)."""

    request_id: RequestId
    issued_at: UInt
    operation: str = ""


class PutSecretResponse(msgspec.Struct, frozen=True):
    """The plain reply to `put_secret`: `{"revision":N,"error":null}` or revision 0 + error."""

    revision: UInt
    error: str | None = None

    def result(self) -> int:
        """The revision written, or raise the error the reply carries."""
        if self.error is not None:
            raise put_error_from_wire(self.error)
        return self.revision


# --- mappings and other admin operations ------------------------------------------------


class MappingRequest(msgspec.Struct, frozen=True):
    """The authenticated `add_mapping`/`remove_mapping` body (the original's is a bare list)."""

    secrets: list[str]
    request_id: RequestId
    issued_at: UInt
    # What the subject says, sealed: a body for remove_mapping.<victim> cannot be sent
    # again as add_mapping.<attacker>.
    operation: str = ""
    entity: str = ""


class AdminRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A generic authenticated lifecycle request (list, mappings, delete, undelete, destroy).

    Our own format, not the original's, so unset fields are left out of the JSON.
    """

    request_id: RequestId
    issued_at: UInt
    name: str | None = None
    version: UInt | None = None
    all: bool = False
    entity: str | None = None
    operation: str = ""  # the operation it is for, sealed (see MappingRequest)


class SecretListing(msgspec.Struct, frozen=True):
    """One secret in a `list` reply: never its value."""

    name: str
    version: int  # the latest readable version, 0 if none is left
    versions: int  # how many versions are readable
    updated_at: float
    deleted: bool = False


class ListReply(msgspec.Struct, frozen=True):
    secrets: list[SecretListing]


class MappingsReply(msgspec.Struct, frozen=True):
    mappings: dict[str, list[str]]


class ChangeReply(msgspec.Struct, frozen=True):
    """The reply to delete, undelete and destroy: the revision written or versions shredded."""

    revision: int = 0
    destroyed: list[int] = msgspec.field(default_factory=list)


LifecycleReply = TypeVar("LifecycleReply", ListReply, MappingsReply, ChangeReply)


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


def _redact(value: object) -> str:
    return "None" if value is None else _REDACTED


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


def put_error_from_wire(value: str) -> ProtocolError:
    """The exception a `put_secret` reply's `error` string stands for (PROTOCOL.md §5)."""
    if value == NoSecretProvided.variant:
        return NoSecretProvided()
    if value == SecretTooLarge.variant:
        return SecretTooLarge()
    if value == RotationInProgress.variant:
        return RotationInProgress()
    if value in TEXT_VARIANTS:  # a put reply names the variant only, without its text
        return TEXT_VARIANTS[value](value)
    return protocol_error_from_wire(value)


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
