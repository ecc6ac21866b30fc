"""Clients of a running backend: the admin side, for the CLI (the host side: tests/support).

`AdminClient` seals admin requests to the backend's transit key with an admin xkey, with
a fresh `request_id` and `issued_at`, and retries a request that timed out, or that the
backend answered with `UpstreamError` (JetStream did not answer it in time: a leader
election, views slow to catch up), with the very same sealed bytes. That is safe because
the request id is inside the seal and bound to the operation: the backend applies it
once and answers a retry of an applied write with the first result (its revision), at
any instance. A user re-running the command would send a new id, and a second write.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from secrets_nats_kv import limits, wire
from secrets_nats_kv.config import BackendNames
from secrets_nats_kv.errors import (
    BackendNotAnswering,
    InvalidPayload,
    InvalidXKey,
    ProtocolError,
    SecretsBackendError,
    SecretTooLarge,
    UpstreamError,
    protocol_error_from_wire,
)
from secrets_nats_kv.nats.jetstream import to_backend_error as convert
from secrets_nats_kv.nats.refusals import request
from secrets_nats_kv.wire import HOST_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey

_UPSTREAM_BACKOFF_S = 0.5


class BackendClient:
    """Request/reply with a backend instance, NATS errors converted."""

    def __init__(self, nc: NATS, names: BackendNames, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.names = names
        self.timeout = timeout

    async def request(
        self, operation: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        subject = self.names.subject(operation)
        try:
            msg = await request(
                self.nc, subject, payload, reply_within=self.timeout, headers=headers
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise BackendNotAnswering(subject, self.timeout) from None
        except nats.errors.Error as exc:
            raise convert(subject, exc) from None
        return msg.data, dict(msg.headers or {})

    async def server_xkey(self) -> str:
        data, _ = await self.request("server_xkey")
        text = data.decode(errors="replace")
        try:
            XKey.from_public(text)
        except Exception:
            raise InvalidXKey("the backend's server_xkey reply is not a curve key") from None
        return text


class TransitKeyMismatch(SecretsBackendError):
    """`server_xkey` was answered with another key than the one the client pins."""

    def __init__(self, answered: str, pinned: str) -> None:
        super().__init__(
            f"server_xkey was answered with {answered}, not the pinned transit key {pinned}: "
            "refusing to seal to it (something else answers on the bus)"
        )


class AdminClient(BackendClient):
    """Admin operations, sealed by `admin_key` to the backend's transit key.

    `transit` pins that key (the CLI knows it from TRANSIT_XKEY_SEED, or TRANSIT_XKEY):
    then nothing is sealed to whatever answers `server_xkey` on the bus, where anyone may
    answer first. With `confirm_transit` the bus's answer is still asked for once and
    must be the pinned key (a check that the right backend is there).
    """

    def __init__(
        self,
        nc: NATS,
        names: BackendNames,
        admin_key: XKey,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        transit: str | None = None,
        confirm_transit: bool = False,
    ) -> None:
        super().__init__(nc, names, timeout=timeout)
        self.admin_key = admin_key
        self.retries = retries
        self._transit = transit
        self._confirm = confirm_transit and transit is not None

    async def _transit_key(self) -> str:
        if self._transit is None:
            self._transit = await self.server_xkey()
        elif self._confirm:
            answered = await self.server_xkey()
            if answered != self._transit:
                raise TransitKeyMismatch(answered, self._transit)
            self._confirm = False
        return self._transit

    async def _sealed_request(self, operation: str, body: bytes) -> bytes:
        transit = await self._transit_key()
        sealed = self.admin_key.seal(body, transit)
        headers = {HOST_XKEY_HEADER: self.admin_key.public_key}
        for attempt in range(self.retries + 1):
            try:
                data, _ = await self.request(operation, sealed, headers)
            except BackendNotAnswering:
                if attempt == self.retries:
                    raise
                continue
            if attempt == self.retries or not upstream_failed(data):
                return data
            await anyio.sleep(_UPSTREAM_BACKOFF_S * (attempt + 1))  # let an election finish
        raise AssertionError("unreachable")

    @staticmethod
    def _stamp() -> tuple[str, int]:
        return uuid.uuid4().hex, int(time.time())

    async def put_secret(self, name: str, value: str | bytes) -> int:
        size = len(value.encode()) if isinstance(value, str) else len(value)
        max_payload = self.nc.max_payload
        limit = limits.max_secret_size(max_payload)
        if size > limit:  # refused here, before anything is sent
            raise SecretTooLarge.sized(size, limit, max_payload)
        request_id, issued_at = self._stamp()
        if isinstance(value, str):
            req = wire.AdminPutSecretRequest(
                key=name,
                string_secret=value,
                request_id=request_id,
                issued_at=issued_at,
                operation="put_secret",
            )
        else:
            req = wire.AdminPutSecretRequest(
                key=name,
                binary_secret=list(value),
                request_id=request_id,
                issued_at=issued_at,
                operation="put_secret",
            )
        body = wire.encode_put_request(req)
        if len(body) + limits.ENVELOPE > max_payload:  # a string heavy with JSON escapes
            raise SecretTooLarge(
                f"the secret is {size} bytes but {len(body)} once escaped for the request, "
                f"over the server's max_payload of {max_payload} bytes "
                f"(the largest secret is {limit} bytes of plain text or binary)"
            )
        data = await self._sealed_request("put_secret", body)
        return wire.decode_put_response(data).result()

    async def add_mapping(self, entity: str, secrets: Sequence[str]) -> None:
        await self._mapping("add_mapping", entity, secrets)

    async def remove_mapping(self, entity: str, secrets: Sequence[str]) -> None:
        await self._mapping("remove_mapping", entity, secrets)

    async def _mapping(self, operation: str, entity: str, secrets: Sequence[str]) -> None:
        request_id, issued_at = self._stamp()
        body = wire.encode_mapping_request(
            wire.MappingRequest(
                list(secrets),
                request_id=request_id,
                issued_at=issued_at,
                operation=operation,
                entity=entity,
            )
        )
        data = await self._sealed_request(f"{operation}.{entity}", body)
        expect_ok(data)

    # --- lifecycle ----------------------------------------------------------------------

    async def _lifecycle(
        self,
        operation: str,
        reply_type: type[wire.LifecycleReply],
        *,
        name: str | None = None,
        version: int | None = None,
        all: bool = False,
        entity: str | None = None,
    ) -> wire.LifecycleReply:
        request_id, issued_at = self._stamp()
        body = wire.encode_admin_request(
            wire.AdminRequest(
                request_id=request_id,
                issued_at=issued_at,
                name=name,
                version=version,
                all=all,
                entity=entity,
                operation=operation,
            )
        )
        data = await self._sealed_request(operation, body)
        return wire.decode_lifecycle_reply(data, reply_type)

    async def list_secrets(self) -> list[wire.SecretListing]:
        return (await self._lifecycle("list", wire.ListReply)).secrets

    async def mappings(self, entity: str | None = None) -> dict[str, list[str]]:
        return (await self._lifecycle("mappings", wire.MappingsReply, entity=entity)).mappings

    async def delete(self, name: str) -> int:
        return (await self._lifecycle("delete", wire.ChangeReply, name=name)).revision

    async def undelete(self, name: str) -> int:
        return (await self._lifecycle("undelete", wire.ChangeReply, name=name)).revision

    async def destroy(
        self, name: str, *, version: int | None = None, all: bool = False
    ) -> list[int]:
        reply = await self._lifecycle(
            "destroy", wire.ChangeReply, name=name, version=version, all=all
        )
        return reply.destroyed


def upstream_failed(data: bytes) -> bool:
    """Whether a reply is the backend's `UpstreamError` (in a put's or another reply's form)."""
    if UpstreamError.variant.encode() not in data:
        return False
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    error = value.get("error") if isinstance(value, dict) else None
    return error == UpstreamError.variant or (
        isinstance(error, dict) and UpstreamError.variant in error
    )


def expect_ok(data: bytes) -> None:
    """A mapping-style reply: `ok`, or a plain error we turn back into its exception."""
    if data == b"ok":
        return
    raise error_of_reply(data)


def error_of_reply(data: bytes) -> ProtocolError:
    try:
        value = msgspec.json.decode(data)
    except Exception:
        return InvalidPayload(data.decode(errors="replace")[:200])
    if isinstance(value, dict) and "error" in value:
        return protocol_error_from_wire(value["error"])
    return InvalidPayload(data.decode(errors="replace")[:200])
