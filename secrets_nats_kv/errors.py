"""One error tree for the whole backend.

The wasmCloud protocol's `GetSecretError` values are exception classes here, one per
failure, so a handler raises the exact value it means and the reply is derived from the
class (PROTOCOL.md §3).  Everything else the kernel can fail at (bad key text, bad JWT,
NATS trouble, bad configuration) has its own class below.  Messages are built in
`__init__` and never contain a secret value, a seed or a JWT.
"""

from __future__ import annotations

from typing import ClassVar


class SecretsBackendError(Exception):
    """Root of every error this project raises on purpose."""


# --- the protocol's GetSecretError values -------------------------------------------------


class ProtocolError(SecretsBackendError):
    """An error with a wire form: serde's external tagging of `GetSecretError`."""

    variant: ClassVar[str] = "Other"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.variant)

    def wire(self) -> str | dict[str, str]:
        """The JSON value of `error` in a `SecretResponse` (a bare string for unit variants)."""
        return self.variant


class SecretNotFound(ProtocolError):
    variant = "SecretNotFound"

    def __init__(self, name: str | None = None, version: int | None = None) -> None:
        what = "secret" if name is None else f"secret {name!r}"
        if version is not None:
            what += f" version {version}"
        super().__init__(f"{what} not found")


class InvalidXKey(ProtocolError):
    variant = "InvalidXKey"

    def __init__(
        self, why: str = "the sender's xkey is missing or is not a curve public key"
    ) -> None:
        super().__init__(why)


class EncryptionError(ProtocolError):
    variant = "EncryptionError"

    def __init__(self, why: str = "could not seal the reply") -> None:
        super().__init__(why)


class DecryptionError(ProtocolError):
    """A sealed message did not open: wrong key, tampered bytes, bad header or too short."""

    variant = "DecryptionError"

    def __init__(self, why: str = "the message did not open with the expected keys") -> None:
        super().__init__(why)


class Unauthorized(ProtocolError):
    variant = "Unauthorized"

    def __init__(self, why: str = "not allowed") -> None:
        super().__init__(why)


class InvalidRequest(ProtocolError):
    variant = "InvalidRequest"

    def __init__(self, why: str = "the request is not a valid SecretRequest") -> None:
        super().__init__(why)


class InvalidPayload(ProtocolError):
    variant = "InvalidPayload"

    def __init__(self, why: str = "the request has no payload") -> None:
        super().__init__(why)


class InvalidHeaders(ProtocolError):
    variant = "InvalidHeaders"

    def __init__(self, why: str = "the request has no headers") -> None:
        super().__init__(why)


class TextProtocolError(ProtocolError):
    """A variant that carries text: encoded as a one-key object `{variant: text}`."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(f"{self.variant}: {text}")

    def wire(self) -> dict[str, str]:
        return {self.variant: self.text}


class InvalidEntityJWT(TextProtocolError):
    variant = "InvalidEntityJWT"


class InvalidHostJWT(TextProtocolError):
    variant = "InvalidHostJWT"


class UpstreamError(TextProtocolError):
    variant = "UpstreamError"


class PolicyError(TextProtocolError):
    variant = "PolicyError"


class Other(TextProtocolError):
    variant = "Other"


UNIT_VARIANTS: dict[str, type[ProtocolError]] = {
    cls.variant: cls
    for cls in (
        SecretNotFound,
        InvalidXKey,
        EncryptionError,
        DecryptionError,
        Unauthorized,
        InvalidRequest,
        InvalidPayload,
        InvalidHeaders,
    )
}
TEXT_VARIANTS: dict[str, type[TextProtocolError]] = {
    cls.variant: cls
    for cls in (InvalidEntityJWT, InvalidHostJWT, UpstreamError, PolicyError, Other)
}


def protocol_error_from_wire(value: object) -> ProtocolError:
    """Rebuild the exception a wire `error` value stands for (used by clients and tests)."""
    if isinstance(value, str) and value in UNIT_VARIANTS:
        return UNIT_VARIANTS[value]()
    if value == RotationInProgress.variant:
        return RotationInProgress()
    if isinstance(value, dict) and len(value) == 1:
        ((variant, text),) = value.items()
        if variant in TEXT_VARIANTS and isinstance(text, str):
            return TEXT_VARIANTS[variant](text)
    return Other(f"unrecognised error value {value!r}")


# --- put_secret's error strings (PROTOCOL.md §5) ------------------------------------------


class NoSecretProvided(ProtocolError):
    """`put_secret` carried neither a string nor a binary value (or both)."""

    variant = "NoSecretProvided"

    def __init__(
        self, why: str = "exactly one of string_secret and binary_secret must be set"
    ) -> None:
        super().__init__(why)


class SecretTooLarge(ProtocolError):
    """`put_secret` carried a value over the largest one that fits end to end."""

    variant = "SecretTooLarge"

    def __init__(self, why: str | None = None) -> None:
        super().__init__(
            why
            or "the secret is larger than the backend stores (a quarter of the server's "
            "max_payload, less 4 KiB: 258048 bytes with the default 1 MiB)"
        )

    @classmethod
    def sized(cls, size: int, limit: int, max_payload: int) -> SecretTooLarge:
        return cls(
            f"the secret is {size} bytes; the largest secret is {limit} bytes "
            f"(a quarter of the server's max_payload of {max_payload} bytes, less 4 KiB)"
        )


class RotationInProgress(ProtocolError):
    """A write refused while an online key rotation has fenced the log (`WritesFenced`).

    Not one of `GetSecretError`'s values (a get is never fenced): only the admin
    operations and `put_secret` answer it, as the bare variant name.
    """

    variant = "RotationInProgress"

    def __init__(self, why: str = "a key rotation is in progress; retry in a few seconds") -> None:
        super().__init__(why)


# --- the kernel's own failures -------------------------------------------------------------


class InvalidKey(SecretsBackendError):
    """Text that is not the nkey (public key or seed) the caller expected."""

    def __init__(self, expected: str, found: str) -> None:
        self.expected = expected
        self.found = found
        super().__init__(f"invalid key: expected {expected}, found {found}")


class InvalidJWT(SecretsBackendError):
    """A wascap JWT that failed validation; `reason` says why, without echoing the token."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InvalidSecretName(SecretsBackendError):
    """A secret name that cannot be a NATS KV key (PROTOCOL.md §6)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"invalid secret name: {why}")


class ConfigError(SecretsBackendError):
    """A flag, environment variable or file that cannot be used as given."""


class NatsUnavailable(SecretsBackendError):
    """NATS could not be reached, refused our credentials, or JetStream is missing."""

    def __init__(self, why: str) -> None:
        super().__init__(why)


class BackendNotAnswering(SecretsBackendError):
    """No backend instance answered a request on its subject in time."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no secrets backend answered on {subject} within {timeout:g}s")


class StorageError(SecretsBackendError):
    """The event log or a KV view refused an operation; wraps the NATS error's text."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
