"""Store actor: the admin operations that store something new (a value, a grant).

`put_secret`, `add_mapping` and `remove_mapping`: authenticate the request, seal any
value with the encryption key, append one event and reply only once this process's
views include it, so an `ok` means every responder will serve it. (The operations on
stored secrets, from listing to destroying, are `actors.lifecycle`'s.)
"""

from __future__ import annotations

from actors.decider import Decider
from actors.gate import AdminGate, Opened
from actors.pool import Reply, Request
from events.types import MappingAdded, MappingRemoved, SecretKind, SecretPut
from projections.state import ViewState
from secrets_nats_kv import limits, wire
from secrets_nats_kv.barrier import Barrier
from secrets_nats_kv.errors import (
    InvalidKey,
    InvalidRequest,
    InvalidSecretName,
    ProtocolError,
    SecretTooLarge,
)
from secrets_nats_kv.naming import validate_entity, validate_secret_name
from secrets_nats_kv.wire import HOST_XKEY_HEADER

OK = Reply(b"ok")


class StoreActor:
    """Actor: turns put_secret and mapping changes into events."""

    def __init__(
        self,
        decider: Decider,
        gate: AdminGate,
        *,
        barrier: Barrier,
        max_payload: int = limits.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self._decider = decider
        self._gate = gate
        self._at_rest = barrier
        self._max_payload = max_payload
        self._max_value = limits.max_secret_size(max_payload)

    # --- put_secret -------------------------------------------------------------------

    async def put_secret(self, request: Request) -> Reply:
        try:
            revision = await self._put(request)
        except ProtocolError as exc:
            return Reply(wire.encode_put_response(0, exc))
        return Reply(wire.encode_put_response(revision))

    async def _put(self, request: Request) -> int:
        if self._gate.insecure and not self._gate.names_admin(request.headers):
            opened = self._gate.open_unauthenticated(request.headers, request.payload)
        else:
            opened = self._gate.open(request.headers, request.payload)
        put = wire.decode_put_request(opened.plaintext, authenticated=opened.authenticated)
        request_id = ""
        if isinstance(put, wire.AdminPutSecretRequest):
            self._gate.check_bound(request.operation, put.operation)
            self._gate.check_issued_at(put.issued_at)
            request_id = put.request_id
        name = _secret_name(put.key)
        kind: SecretKind = "string" if put.string_secret is not None else "binary"
        value = put.value_bytes()
        if len(value) > self._max_value:  # it would not fit a host's get reply
            raise SecretTooLarge.sized(len(value), self._max_value, self._max_payload)
        provenance = self._decider.provenance(opened, request_id)

        def decide(_: ViewState) -> SecretPut:
            # Sealed here, on the state the append follows: a backend switching to a new
            # key (an online rotation) switches both at once, never one without the other.
            return SecretPut(name=name, sealed=self._at_rest.seal(value), kind=kind, **provenance)

        return await self._decider.append_revision(decide, request_id)

    # --- mappings ---------------------------------------------------------------------

    async def add_mapping(self, request: Request) -> Reply:
        return await self._change_mapping(request, MappingAdded)

    async def remove_mapping(self, request: Request) -> Reply:
        return await self._change_mapping(request, MappingRemoved)

    async def _change_mapping(
        self, request: Request, event_type: type[MappingAdded] | type[MappingRemoved]
    ) -> Reply:
        if request.argument is None:
            return Reply(b"invalid subject")
        try:
            entity = validate_entity(request.argument)
        except InvalidKey as exc:
            raise InvalidRequest(str(exc)) from None
        if self._gate.insecure and not self._gate.names_admin(request.headers):
            # The original's form: a plain JSON array from anyone.
            sender = (request.headers or {}).get(HOST_XKEY_HEADER, "")
            opened = Opened(sender, request.payload, authenticated=False)
        else:
            opened = self._gate.open(request.headers, request.payload)
        payload = wire.decode_mapping_request(opened.plaintext, authenticated=opened.authenticated)
        request_id = ""
        if isinstance(payload, wire.MappingRequest):
            self._gate.check_bound(
                request.operation, payload.operation, entity=entity, sealed_entity=payload.entity
            )
            self._gate.check_issued_at(payload.issued_at)
            request_id = payload.request_id
            names = payload.secrets
        else:
            names = payload
        secrets = tuple(_secret_name(name) for name in names)
        provenance = self._decider.provenance(opened, request_id)
        event = event_type(entity=entity, secrets=secrets, **provenance)
        await self._decider.append(lambda _: event, request_id)
        return OK


def _secret_name(name: str) -> str:
    try:
        return validate_secret_name(name)
    except InvalidSecretName as exc:
        raise InvalidRequest(str(exc)) from None
