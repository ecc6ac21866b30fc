"""secrets-nats-kv kernel: keys, JWTs, wire types, config, CLI; shared by every room."""

__version__ = "0.1.0"
