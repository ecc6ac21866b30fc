"""The wasmCloud side: `server_xkey` and `get`, served from the live view.

Checks run in the original's order (PROTOCOL.md §3), each failure raising the exact
protocol error. A get never touches KV: the mapping and the sealed value come from the
in-memory view, once the view has caught up with every write acknowledged before the
request arrived that can change this get's answer (`projections.freshness`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from actors.gate import sender_key
from actors.pool import Reply, Request
from actors.transit import TransitKeys
from events.access import AccessRecord
from projections.live import LiveView
from projections.state import Version
from secrets_nats_kv import wire
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import (
    EncryptionError,
    InvalidEntityJWT,
    InvalidHostJWT,
    InvalidJWT,
    NatsUnavailable,
    ProtocolError,
    SecretNotFound,
    StorageError,
    Unauthorized,
    UpstreamError,
)
from secrets_nats_kv.jwt import Claims, verify_entity_jwt, verify_host_jwt
from secrets_nats_kv.limits import cut
from secrets_nats_kv.wire import RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey

log = logging.getLogger(__name__)


class GetResponder:
    """Actor: answers hosts. Stateless apart from keys; many run side by side."""

    def __init__(
        self,
        view: LiveView,
        *,
        transit: TransitKeys,
        barrier: Barrier,
        trusted_issuers: frozenset[str] = frozenset(),
        freshness_timeout: float = 5.0,
        on_decision: Callable[[AccessRecord], None] | None = None,
    ) -> None:
        self._view = view
        self._transit = transit
        self._at_rest = barrier
        self._trusted = trusted_issuers
        self._freshness_timeout = freshness_timeout
        self._on_decision = on_decision
        self._xkey_reply = Reply(transit.current.public_key.encode())

    async def server_xkey(self, request: Request) -> Reply:
        return self._xkey_reply

    async def get(self, request: Request) -> Reply:
        context: dict[str, str | None] = {}
        try:
            reply = await self._get(request, context)
        except ProtocolError as exc:
            self._record(context, granted=False, error=exc)
            raise  # the pool renders it as the plain error reply, and counts it
        self._record(context, granted=True, error=None)
        return reply

    async def _get(self, request: Request, context: dict[str, str | None]) -> Reply:
        host_key = sender_key(request.headers, request.payload)
        plaintext, transit_key = self._transit.open(request.payload, host_key)
        context["transit_key"] = transit_key.public_key
        secret_request = wire.decode_secret_request(plaintext)
        context["secret"] = secret_request.key
        context["version"] = secret_request.version
        entity = self._verify(secret_request.context.entity_jwt, entity=True)
        context["entity"] = entity.sub
        host = self._verify(secret_request.context.host_jwt, entity=False)
        context["host"] = host.sub
        self._transit.note_use(transit_key, host.sub)  # only hosts that proved themselves
        await self._wait_fresh(secret_request.key, entity.sub)
        allowed = self._view.state.mappings.get(entity.sub)
        if not allowed or secret_request.key not in allowed:
            raise Unauthorized(f"{entity.sub} is not mapped to {secret_request.key!r}")
        version = self._find(secret_request.key, secret_request.requested_revision())
        value = self._at_rest.open(version.sealed or b"")
        response = self._render(version, value, secret_request.field)
        reply_key = XKey.generate()
        try:
            sealed = reply_key.seal(response, host_key)
        except Exception:
            raise EncryptionError() from None
        return Reply(sealed, {RESPONSE_XKEY_HEADER: reply_key.public_key})

    def _verify(self, token: str, *, entity: bool) -> Claims:
        error = InvalidEntityJWT if entity else InvalidHostJWT
        verify = verify_entity_jwt if entity else verify_host_jwt
        try:
            return verify(token, trusted_issuers=self._trusted)
        except InvalidJWT as exc:
            raise error(exc.reason) from None

    async def _wait_fresh(self, secret: str, entity: str) -> None:
        try:  # what this get depends on: a backlog elsewhere in the log does not hold it
            await self._view.wait_fresh(self._freshness_timeout, secret=secret, entity=entity)
        except TimeoutError:
            raise UpstreamError("the backend's view is behind the event log") from None
        except (StorageError, NatsUnavailable) as exc:
            raise UpstreamError(str(exc)) from None

    def _find(self, name: str, revision: int | None) -> Version:
        record = self._view.state.secrets.get(name)
        if record is None:
            raise SecretNotFound(name, revision)
        found = record.latest() if revision is None else record.version(revision)
        if found is None:
            raise SecretNotFound(name, revision)
        return found

    @staticmethod
    def _render(version: Version, value: bytes, field: str | None) -> bytes:
        if version.kind == "binary":
            return wire.encode_secret_response(wire.Secret.of_bytes(str(version.revision), value))
        text = value.decode("utf-8", errors="replace")
        if field is not None:
            text = _json_member(text, field, version.revision)
        return wire.encode_secret_response(wire.Secret.of_string(str(version.revision), text))

    def _record(
        self, context: dict[str, str | None], *, granted: bool, error: ProtocolError | None
    ) -> None:
        if self._on_decision is None or "secret" not in context:
            return
        self._on_decision(
            AccessRecord(  # what the access log keeps of a get: never a value, and every
                at=time.time(),  # field a requester chose cut short (a 900 KB key is 256)
                secret=cut(context["secret"]) or "",
                version=cut(context.get("version")),
                entity=cut(context.get("entity")),
                host=cut(context.get("host")),
                granted=granted,
                error=None if error is None else cut(json.dumps(error.wire()), 1024),
                transit_key=context.get("transit_key"),
            )
        )


def _json_member(text: str, field: str, revision: int) -> str:
    """`field` of a JSON-object secret (strings as-is, other values as JSON); else the text."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # nested past the parser's limit: not an object to us
        return text
    if not isinstance(document, dict):
        return text
    if field not in document:
        raise SecretNotFound(f"field {field!r} of the secret", revision)
    member = document[field]
    return member if isinstance(member, str) else json.dumps(member)
