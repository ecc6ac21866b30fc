"""Parsed command-line arguments turned into the project's settings.

Every command that talks to NATS builds its connection options and the backend's names
the same way; this module is that one way, so a flag means the same in every command.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from secrets_nats_kv import config
from secrets_nats_kv.config import BackendNames, NatsOptions
from secrets_nats_kv.errors import ConfigError, InvalidSecretName
from secrets_nats_kv.naming import validate_secret_name
from secrets_nats_kv.permissions import NatsRole, inbox_prefix

if TYPE_CHECKING:
    from projections.kv import KvLayout


def nats_options(args: argparse.Namespace) -> NatsOptions:
    return NatsOptions(
        servers=config.server_urls(args.nats_address),
        creds_file=getattr(args, "nats_creds_file", None),
        nkey_seed_file=getattr(args, "nats_nkey_seed_file", None),
        user=getattr(args, "nats_user", None),
        password=getattr(args, "nats_password", None),
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        inbox_prefix=_admin_inbox(args),
    )


def _admin_inbox(args: argparse.Namespace) -> str | None:
    """The CLI's reply inboxes, apart from the hosts' (see secrets_nats_kv.permissions)."""
    if not hasattr(args, "backend_name"):
        return None
    return inbox_prefix(backend_names(args), NatsRole.ADMIN)


def backend_names(args: argparse.Namespace) -> BackendNames:
    return BackendNames(
        name=args.backend_name,
        subject_base=args.subject_base,
        api_version=args.secrets_api_version,
        queue_base=args.nats_queue_base,
        secrets_bucket=getattr(args, "secrets_bucket", config.DEFAULT_SECRETS_BUCKET),
    )


def rewrite_layout(args: argparse.Namespace) -> KvLayout:
    """The buckets `rebuild`, `repair` and `import` (re)create, with the run's settings."""
    from projections.kv import KvLayout

    names = backend_names(args)
    return KvLayout(
        secrets_bucket=names.secrets_bucket,
        state_bucket=names.state_bucket,
        max_history=args.max_secret_history,
        replicas=args.replicas,
    )


def secret_name(name: str) -> str:
    """A secret name from the command line, or the one-line reason it is not one."""
    try:
        return validate_secret_name(name)
    except InvalidSecretName as exc:
        raise ConfigError(str(exc)) from None
