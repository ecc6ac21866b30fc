"""Every size and retention limit of the backend, derived in one place.

The largest secret follows the server's `max_payload` (1 MiB by default): a binary value
travels as a JSON array of bytes (up to four characters per byte) in the put request and
in a host's get reply, so a quarter of the payload limit, less room for the rest of the
message, is what fits end to end. The event log's largest message follows from it (a
sealed value is base64 in an event), which also bounds what one junk message can cost.
The access log keeps 90 days or 256 MiB, whichever is reached first, and cuts every field
a requester chose (the key, the version) to a bounded length.
"""

from __future__ import annotations

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default max_payload
ENVELOPE = 4096  # bytes of a put request or get reply besides the value
SEAL_OVERHEAD = 40  # xkv1: tag, nonce and box
ACCESS_LOG_MAX_BYTES = 256 * 1024 * 1024  # reserved on the server: keep it modest
ACCESS_LOG_MAX_AGE_DAYS = 90
ACCESS_FIELD_MAX = 256  # characters of any field of an access record


def max_secret_size(max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """The largest value (string bytes or binary) a put stores and a get returns."""
    return max_payload // 4 - ENVELOPE


def max_event_size(max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """The event stream's largest message: a put of the largest value, sealed, in base64."""
    sealed = max_secret_size(max_payload) + SEAL_OVERHEAD
    return -(-sealed // 3) * 4 + ENVELOPE


def cut(text: str | None, limit: int = ACCESS_FIELD_MAX) -> str | None:
    """`text` shortened to `limit` characters (marked with `…`), for records of requests."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"
