"""Configuration of the backend and of its NATS connection, with the original's names.

Flags and environment variables keep the names of the original `secrets-nats-kv`
(PROTOCOL.md §6); everything derived from them (subjects, queue group, bucket and stream
names) is computed here once so every room agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from secrets_nats_kv import limits
from secrets_nats_kv.errors import ConfigError
from secrets_nats_kv.xkeys import XKey

DEFAULT_NATS_ADDRESS = "127.0.0.1:4222"
DEFAULT_SUBJECT_BASE = "wasmcloud.secrets"
DEFAULT_API_VERSION = "v1alpha1"
DEFAULT_NAME = "nats-kv"
DEFAULT_SECRETS_BUCKET = "WASMCLOUD_SECRETS"
DEFAULT_MAX_SECRET_HISTORY = 64
DEFAULT_QUEUE_BASE = "wasmcloud_secrets"
REQUEST_CLOCK_SKEW_S = 120
KIND_HEADER = "Secret-Kind"  # on KV entries: how the operator stored the value


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket (NATS's naming)."""
    return f"KV_{bucket}"


def server_urls(address: str) -> tuple[str, ...]:
    """`--nats-address` text (one address or a comma-separated list) as server URLs."""
    urls = []
    for part in address.split(","):
        part = part.strip()
        if not part:
            continue
        urls.append(part if "://" in part else f"nats://{part}")
    if not urls:
        raise ConfigError("--nats-address is empty")
    return tuple(urls)


@dataclass(frozen=True)
class NatsOptions:
    """How to reach and authenticate to NATS; paths only, never secret material itself."""

    servers: tuple[str, ...] = (f"nats://{DEFAULT_NATS_ADDRESS}",)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None  # reply inboxes of a role of its own (see permissions)


@dataclass(frozen=True)
class BackendNames:
    """Subjects, queue group, stream and bucket names of one backend instance."""

    name: str = DEFAULT_NAME
    subject_base: str = DEFAULT_SUBJECT_BASE
    api_version: str = DEFAULT_API_VERSION
    queue_base: str = DEFAULT_QUEUE_BASE
    secrets_bucket: str = DEFAULT_SECRETS_BUCKET

    def __post_init__(self) -> None:
        for label, value in (("--name", self.name), ("--secrets-api-version", self.api_version)):
            if not value or any(c in value for c in ".*> \t"):
                raise ConfigError(f"{label} must be one subject token, got {value!r}")

    @property
    def subject_prefix(self) -> str:
        return f"{self.subject_base}.{self.api_version}.{self.name}"

    def subject(self, operation: str) -> str:
        return f"{self.subject_prefix}.{operation}"

    @property
    def queue_group(self) -> str:
        return f"{self.queue_base}.{self.name}"

    @property
    def state_bucket(self) -> str:
        return f"SECRETS_{self.name}_state"


@dataclass(frozen=True)
class BackendConfig:
    """Everything `run` needs. Keys are kept as `XKey` objects, whose repr hides seeds."""

    transit_key: XKey
    encryption_key: XKey
    previous_transit_keys: tuple[XKey, ...] = ()  # still opened for gets (host key caches)
    # The key an online rotation moves to: values and tags under it are accepted too.
    next_encryption_key: XKey | None = None
    names: BackendNames = BackendNames()
    nats: NatsOptions = NatsOptions()
    max_secret_history: int = DEFAULT_MAX_SECRET_HISTORY
    replicas: int = 1
    admin_xkeys: tuple[str, ...] = ()
    insecure_unauthenticated_admin: bool = False
    trusted_issuers: tuple[str, ...] = ()
    access_log: bool = True
    access_log_max_bytes: int = limits.ACCESS_LOG_MAX_BYTES
    access_log_max_age_days: int = limits.ACCESS_LOG_MAX_AGE_DAYS
    request_concurrency: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.max_secret_history <= 64:
            raise ConfigError("--max-secret-history must be between 1 and 64")
        if self.replicas < 1:
            raise ConfigError("--replicas must be at least 1")
        if self.access_log_max_bytes < 1024 * 1024 or self.access_log_max_age_days < 1:
            raise ConfigError(
                "--access-log-max-bytes must be at least 1 MiB and --access-log-max-age-days 1"
            )
        if not self.transit_key.has_private or not self.encryption_key.has_private:
            raise ConfigError("the transit and encryption keys must be curve seeds (SX…)")
        if not all(key.has_private for key in self.previous_transit_keys):
            raise ConfigError("previous transit keys must be curve seeds (SX…)")
        following = self.next_encryption_key
        if following is not None and not following.has_private:
            raise ConfigError("the next encryption key must be a curve seed (SX…)")
        if following is not None and following.public_key == self.encryption_key.public_key:
            raise ConfigError("the next encryption key is the current one: give a new key")
        transit = [self.transit_key.public_key]
        transit += [key.public_key for key in self.previous_transit_keys]
        if len(set(transit)) != len(transit):
            raise ConfigError("a previous transit key repeats the current one or another")

    @property
    def admin_public_keys(self) -> frozenset[str]:
        """Keys allowed to sign admin operations: the transit key and every --admin-xkey."""
        return frozenset((self.transit_key.public_key, *self.admin_xkeys))
