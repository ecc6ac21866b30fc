"""`import`: take over the buckets of the original Rust secrets-nats-kv (see importer)."""
