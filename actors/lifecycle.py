"""Lifecycle actor: list, mappings, delete, undelete and destroy.

Each is an admin operation on the backend's subject, authenticated like `put_secret`
(a sealed `AdminRequest`). Reads answer from the live view once it is fresh
(`FreshReads`); changes are decided on a fresh view and appended as the log's very next
entry (`Decider`: the whole stream's last sequence is pinned), so two admins racing,
on one secret or on any, cannot both act on the same state.
"""

from __future__ import annotations

from actors.decider import Decider
from actors.gate import AdminGate, Opened
from actors.pool import Reply, Request
from events.types import SecretDeleted, SecretDestroyed, SecretUndeleted
from projections.state import SecretRecord, ViewState, shred_plan
from secrets_nats_kv import wire
from secrets_nats_kv.errors import (
    InvalidKey,
    InvalidRequest,
    InvalidSecretName,
    SecretNotFound,
)
from secrets_nats_kv.naming import validate_entity, validate_secret_name


class LifecycleActor:
    """Actor: the operations an operator uses to look after secrets over their life."""

    def __init__(self, decider: Decider, gate: AdminGate) -> None:
        self._decider = decider
        self._reads = decider.reads
        self._gate = gate

    def _open(self, request: Request) -> tuple[Opened, wire.AdminRequest]:
        opened = self._gate.open(request.headers, request.payload)
        admin = wire.decode_admin_request(opened.plaintext)
        self._gate.check_bound(request.operation, admin.operation)
        self._gate.check_issued_at(admin.issued_at)
        return opened, admin

    # --- reads ------------------------------------------------------------------------

    async def list(self, request: Request) -> Reply:
        self._open(request)
        state = await self._reads.state()
        listing = []
        for name, record in sorted(state.secrets.items()):
            latest = record.latest() if not record.deleted else None
            if latest is None and not record.deleted and not record.live_versions():
                continue  # everything destroyed: nothing left to list
            listing.append(
                wire.SecretListing(
                    name=name,
                    version=latest.revision if latest else 0,
                    versions=len(record.live_versions()),
                    updated_at=record.updated_at,
                    deleted=record.deleted,
                )
            )
        return Reply(wire.encode_reply(wire.ListReply(listing)))

    async def mappings(self, request: Request) -> Reply:
        _, admin = self._open(request)
        mappings = (await self._reads.state()).mappings
        if admin.entity is not None:
            entity = _entity(admin.entity)
            selected = {entity: sorted(mappings.get(entity, ()))}
        else:
            selected = {entity: sorted(names) for entity, names in sorted(mappings.items())}
        return Reply(wire.encode_reply(wire.MappingsReply(selected)))

    # --- changes ----------------------------------------------------------------------

    async def delete(self, request: Request) -> Reply:
        opened, admin = self._open(request)
        name = _name(admin)
        provenance = self._decider.provenance(opened, admin.request_id)

        def decide(state: ViewState) -> SecretDeleted:
            record = _record(state, name)
            if record.latest() is None:
                raise SecretNotFound(name)
            return SecretDeleted(name=name, **provenance)

        revision = await self._decider.append_revision(decide, admin.request_id)
        return Reply(wire.encode_reply(wire.ChangeReply(revision=revision)))

    async def undelete(self, request: Request) -> Reply:
        opened, admin = self._open(request)
        name = _name(admin)
        provenance = self._decider.provenance(opened, admin.request_id)

        def decide(state: ViewState) -> SecretUndeleted:
            record = _record(state, name)
            if record.newest_readable() is None:  # destroyed: as absent as never put
                raise SecretNotFound(name)
            if not record.deleted:
                raise InvalidRequest(f"secret {name!r} is not deleted")
            return SecretUndeleted(name=name, **provenance)

        revision = await self._decider.append_revision(decide, admin.request_id)
        return Reply(wire.encode_reply(wire.ChangeReply(revision=revision)))

    async def destroy(self, request: Request) -> Reply:
        opened, admin = self._open(request)
        name = _name(admin)
        if admin.all == (admin.version is not None):
            raise InvalidRequest("destroy needs exactly one of a version or all")
        provenance = self._decider.provenance(opened, admin.request_id)

        reads = self._reads

        def decide(state: ViewState) -> SecretDestroyed:
            record = _record(state, name)
            versions, seqs = shred_plan(record, admin.version)
            requests = {v.event_seq: v.origin_request for v in record.versions.values()}
            return SecretDestroyed(
                name=name,
                versions=versions,
                erased_seqs=seqs,
                # What the erased bytes were, so the chain stays verifiable without them.
                erased_digests=tuple(reads.digest(seq) for seq in seqs),
                erased_request_ids=tuple(requests.get(seq, "") for seq in seqs),
                all=admin.all,
                **provenance,
            )

        appended = await self._decider.append(decide, admin.request_id)
        destroyed = self._reads.current().destroyed.get(appended.seq, ())
        return Reply(wire.encode_reply(wire.ChangeReply(destroyed=list(destroyed))))


def _record(state: ViewState, name: str) -> SecretRecord:
    record = state.secrets.get(name)
    if record is None:
        raise SecretNotFound(name)
    return record


def _name(admin: wire.AdminRequest) -> str:
    if admin.name is None:
        raise InvalidRequest("no secret name given")
    try:
        return validate_secret_name(admin.name)
    except InvalidSecretName as exc:
        raise InvalidRequest(str(exc)) from None


def _entity(text: str) -> str:
    try:
        return validate_entity(text)
    except InvalidKey as exc:
        raise InvalidRequest(str(exc)) from None
