"""A wasmCloud host's side of `get`, for tests and benchmarks.

It speaks exactly as a host does: a fresh xkey per request, the reply opened with the
server's one-off key. Test-only: the product never asks for a secret as a host.
"""

from __future__ import annotations

from secrets_nats_kv import wire
from secrets_nats_kv.app.client import BackendClient
from secrets_nats_kv.wire import HOST_XKEY_HEADER, RESPONSE_XKEY_HEADER
from secrets_nats_kv.xkeys import XKey


class HostClient(BackendClient):
    """A wasmCloud host's side of `get`."""

    async def get(
        self,
        key: str,
        *,
        entity_jwt: str,
        host_jwt: str,
        version: str | None = None,
        field: str | None = None,
        application: str | None = None,
        transit: str | None = None,
    ) -> wire.Secret:
        """`get` as a host does it; `transit` seals to a key the host cached instead of
        asking `server_xkey` (a wasmCloud host asks once per backend, for its whole life)."""
        transit = transit or await self.server_xkey()
        host_key = XKey.generate()
        body = wire.encode_secret_request(
            wire.SecretRequest(
                key=key,
                field=field,
                version=version,
                context=wire.Context(
                    entity_jwt=entity_jwt,
                    host_jwt=host_jwt,
                    application=wire.Application(name=application),
                ),
            )
        )
        sealed = host_key.seal(body, transit)
        data, headers = await self.request("get", sealed, {HOST_XKEY_HEADER: host_key.public_key})
        server_key = headers.get(RESPONSE_XKEY_HEADER)
        if server_key is None:
            return wire.decode_secret_response(data)  # raises the error it carries
        return wire.decode_secret_response(host_key.open(data, server_key))
