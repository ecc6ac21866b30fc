"""Lifecycle actor: list, mappings, delete, undelete and destroy.

Each is an admin operation on the backend's subject, authenticated like `put_secret`
(a sealed `AdminRequest`). Reads answer from the live view once it is fresh; changes
check the view, then append conditionally on the secret's last log entry, so two
admins racing on one secret cannot both act on the same state.
"""

from __future__ import annotations

from actors.admin import AdminGate, Opened
from actors.appender import Appender
from actors.pool import Reply, Request
from events.types import SecretDeleted, SecretDestroyed, SecretUndeleted
from projections.state import SecretRecord, ViewState
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

    def __init__(self, appender: Appender, gate: AdminGate) -> None:
        self._appender = appender
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
        await self._appender.fresh()
        listing = []
        for name, record in sorted(self._appender.view.state.secrets.items()):
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
        await self._appender.fresh()
        mappings = self._appender.view.state.mappings
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
        provenance = self._appender.provenance(opened, admin.request_id)

        def decide(state: ViewState) -> SecretDeleted:
            record = _record(state, name)
            if record.latest() is None:
                raise SecretNotFound(name)
            return SecretDeleted(name=name, **provenance)

        revision = await self._appender.append_revision(decide, admin.request_id)
        return Reply(wire.encode_reply(wire.ChangeReply(revision=revision)))

    async def undelete(self, request: Request) -> Reply:
        opened, admin = self._open(request)
        name = _name(admin)
        provenance = self._appender.provenance(opened, admin.request_id)

        def decide(state: ViewState) -> SecretUndeleted:
            record = _record(state, name)
            if record.newest_readable() is None:  # destroyed: as absent as never put
                raise SecretNotFound(name)
            if not record.deleted:
                raise InvalidRequest(f"secret {name!r} is not deleted")
            return SecretUndeleted(name=name, **provenance)

        revision = await self._appender.append_revision(decide, admin.request_id)
        return Reply(wire.encode_reply(wire.ChangeReply(revision=revision)))

    async def destroy(self, request: Request) -> Reply:
        opened, admin = self._open(request)
        name = _name(admin)
        if admin.all == (admin.version is not None):
            raise InvalidRequest("destroy needs exactly one of a version or all")
        provenance = self._appender.provenance(opened, admin.request_id)

        digests = self._appender.view.digests

        def decide(state: ViewState) -> SecretDestroyed:
            record = _record(state, name)
            versions, seqs = _shred_plan(record, admin.version)
            requests = {v.event_seq: v.origin_request for v in record.versions.values()}
            return SecretDestroyed(
                name=name,
                versions=versions,
                erased_seqs=seqs,
                # What the erased bytes were, so the chain stays verifiable without them.
                erased_digests=tuple(digests[seq] for seq in seqs),
                erased_request_ids=tuple(requests.get(seq, "") for seq in seqs),
                all=admin.all,
                **provenance,
            )

        appended = await self._appender.append(decide, admin.request_id)
        destroyed = self._appender.view.state.destroyed.get(appended.seq, ())
        return Reply(wire.encode_reply(wire.ChangeReply(destroyed=list(destroyed))))


def _record(state: ViewState, name: str) -> SecretRecord:
    record = state.secrets.get(name)
    if record is None:
        raise SecretNotFound(name)
    return record


def _shred_plan(
    record: SecretRecord, version: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Versions to shred and the log entries holding their bytes.

    Versions sharing bytes (an undelete's copy and the put it copied) go together:
    shredding one without the other would leave the value readable.
    """
    if version is None:
        targets = record.live_versions()
        if not targets and not record.revisions:
            raise SecretNotFound(record.name)
        return tuple(record.revisions), tuple(sorted({v.event_seq for v in targets}))
    chosen = record.versions.get(version)
    if chosen is None or chosen.sealed is None:
        raise SecretNotFound(record.name, version)
    sharing = [v for v in record.live_versions() if v.origin == chosen.origin]
    return (
        tuple(sorted(v.revision for v in sharing)),
        (chosen.event_seq,),
    )


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
