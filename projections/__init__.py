"""Projections: the fold of the event log, kept live in memory and written to KV views."""
