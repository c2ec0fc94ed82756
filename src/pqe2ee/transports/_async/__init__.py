"""Async sources of the transports (edit these; see scripts/unasync.py)."""
