"""Who may write: authentication of admin operations.

An admin request is sealed to the transit key by an admin xkey (the transit key itself or
one given with `--admin-xkey`); the header `WasmCloud-Host-Xkey` names the sender. Its
`issued_at` must be within 120 s of our clock, and its `request_id` is the append's
`Nats-Msg-Id`, so a replay inside the window is answered with the first result.
`--insecure-unauthenticated-admin` restores the original's open forms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from secrets_nats_kv.config import REQUEST_CLOCK_SKEW_S
from secrets_nats_kv.errors import (
    InvalidHeaders,
    InvalidKey,
    InvalidPayload,
    InvalidXKey,
    Unauthorized,
)
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey


@dataclass(frozen=True, slots=True)
class Opened:
    """An admin request's plaintext and the key that sent it."""

    sender: str
    plaintext: bytes
    authenticated: bool


def sender_key(headers: Mapping[str, str] | None, payload: bytes) -> XKey:
    """The request's sender xkey, checked in the protocol's order (PROTOCOL.md §3)."""
    if not payload:
        raise InvalidPayload()
    if not headers:
        raise InvalidHeaders()
    text = headers.get(HOST_XKEY_HEADER)
    if not text:
        raise InvalidXKey(f"missing {HOST_XKEY_HEADER} header")
    try:
        return XKey.from_public(text)
    except InvalidKey:
        raise InvalidXKey(f"{HOST_XKEY_HEADER} is not a curve public key") from None


class AdminGate:
    """Opens admin requests and refuses those not sealed by an admin key."""

    def __init__(
        self,
        transit: XKey,
        admin_keys: frozenset[str],
        *,
        insecure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._transit = transit
        self._admin_keys = admin_keys
        self.insecure = insecure
        self._clock = clock

    def open(self, headers: Mapping[str, str] | None, payload: bytes) -> Opened:
        """An admin request: sealed by an admin key, in every mode (lifecycle uses only this)."""
        sender = sender_key(headers, payload)
        if sender.public_key not in self._admin_keys:
            raise Unauthorized(f"{sender.public_key} is not an admin key")
        plaintext = self._transit.open(payload, sender)
        return Opened(sender.public_key, plaintext, authenticated=True)

    def names_admin(self, headers: Mapping[str, str] | None) -> bool:
        """Whether the request claims an admin key as sender (then it must be the admin form)."""
        return (headers or {}).get(HOST_XKEY_HEADER) in self._admin_keys

    def open_unauthenticated(self, headers: Mapping[str, str] | None, payload: bytes) -> Opened:
        """The original's `put_secret`: sealed to the transit key by any key (insecure mode only).

        Callers route a request that names an admin key to `open`, so an admin's request
        keeps its replay protection and is recorded as authenticated in this mode too.
        """
        if not self.insecure:
            raise Unauthorized("unauthenticated admin requests are not accepted")
        sender = sender_key(headers, payload)
        plaintext = self._transit.open(payload, sender)
        return Opened(sender.public_key, plaintext, authenticated=False)

    @staticmethod
    def check_bound(
        operation: str,
        sealed_operation: str,
        *,
        entity: str | None = None,
        sealed_entity: str | None = None,
    ) -> None:
        """The sealed body must name the operation (and entity) the subject does: otherwise
        it is someone's request re-published on another subject (re-aimed)."""
        if sealed_operation != operation:
            named = sealed_operation or "no operation"
            raise Unauthorized(f"the sealed request is for {named!r}, not {operation!r}")
        if entity is not None and sealed_entity != entity:
            named = sealed_entity or "no entity"
            raise Unauthorized(f"the sealed request is for entity {named!r}, not {entity!r}")

    def check_issued_at(self, issued_at: int) -> None:
        skew = abs(self._clock() - issued_at)
        if skew > REQUEST_CLOCK_SKEW_S:
            raise Unauthorized(
                f"request issued {skew:.0f}s away from the backend's clock "
                f"(limit {REQUEST_CLOCK_SKEW_S}s)"
            )
