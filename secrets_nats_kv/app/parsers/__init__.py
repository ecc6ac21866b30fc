"""The argparse builders of `secrets-nats-kv`, one module per family of commands.

`cli.build_parser` calls them in the order `--help` lists the commands; `options` holds
the pieces they share (the NATS and naming groups, seed flags, one-line usage errors).
"""
