"""Servers shipped with pqe2ee."""
