"""The application shell: CLI, client commands, `dev`, workers, logging.

It may import every layer below it; nothing below imports it.
"""
