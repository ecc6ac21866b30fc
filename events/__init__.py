"""The event log: every secret and mapping change as a sealed, append-only event."""
