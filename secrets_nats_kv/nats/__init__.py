"""The NATS adapter: the only nats-py users below the actors.

Connections, every raw `$JS.API` request and its error codes, pinned publishes.
"""
