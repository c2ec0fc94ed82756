"""Sync transports GENERATED from ../_async by scripts/unasync.py."""
