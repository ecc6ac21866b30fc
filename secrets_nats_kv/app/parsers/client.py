"""The parsers of the secret and mapping commands: put, get, add-mapping,
remove-mapping, list, mappings, delete, undelete and destroy.
"""

from __future__ import annotations

from typing import Any

from secrets_nats_kv.app.parsers.options import add_command, add_names, add_nats, version_number


def add_client_parsers(commands: Any) -> None:
    put = add_command(commands, "put", "store a new version of a secret", seed="transit")
    put.add_argument("name")
    value = put.add_mutually_exclusive_group()
    value.add_argument("--string", help="the value (prefer env SECRET_STRING_VALUE)")
    value.add_argument(
        "--binary", metavar="FILE", help="read a binary value from FILE (env SECRET_BINARY_FILE)"
    )
    put.add_argument(
        "--secret-version",
        metavar="VERSION",
        default=None,
        help="accepted for the original's scripts and ignored: the backend assigns versions",
    )
    add_nats(put)
    add_names(put, bucket=False)

    get = add_command(
        commands, "get", "read a secret straight from the KV bucket", seed="encryption"
    )
    get.add_argument("name")
    get.add_argument("--secret-version", type=version_number, default=None, metavar="VERSION")
    get.add_argument(
        "--kind",
        choices=("string", "binary"),
        default=None,
        help="fail unless the secret was stored as this kind (default: whichever it is)",
    )
    get.add_argument("--output", metavar="FILE", help="write the value to FILE")
    add_nats(get)
    add_names(get)

    for command, verb in (("add-mapping", "allow"), ("remove-mapping", "disallow")):
        mapping = add_command(
            commands, command, f"{verb} a component or provider to read secrets", seed="transit"
        )
        mapping.add_argument("entity", metavar="PUBKEY")
        mapping.add_argument("--secret", action="append", required=True, metavar="NAME")
        add_nats(mapping)
        add_names(mapping, bucket=False)

    listing = add_command(
        commands, "list", "list secrets with their latest version", seed="transit"
    )
    add_nats(listing)
    add_names(listing, bucket=False)

    mappings = add_command(
        commands, "mappings", "show which entities may read what", seed="transit"
    )
    mappings.add_argument("entity", metavar="PUBKEY", nargs="?")
    add_nats(mappings)
    add_names(mappings, bucket=False)

    for command, text in (
        ("delete", "soft-delete a secret (history kept; undelete restores it)"),
        ("undelete", "restore a deleted secret"),
    ):
        change = add_command(commands, command, text, seed="transit")
        change.add_argument("name")
        add_nats(change)
        add_names(change, bucket=False)

    destroy = add_command(
        commands,
        "destroy",
        "crypto-shred versions of a secret: erased from the log and the KV",
        seed="transit",
    )
    destroy.add_argument("name")
    which = destroy.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=version_number, dest="secret_version")
    which.add_argument("--all", action="store_true")
    add_nats(destroy)
    add_names(destroy, bucket=False)
