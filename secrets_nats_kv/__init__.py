"""secrets-nats-kv: the kernel shared by every room of the backend (keys, JWTs, wire types, config, CLI)."""

__version__ = "0.1.0"
