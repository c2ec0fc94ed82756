"""Test doubles shipped with pqe2ee: :mod:`pqe2ee.testing.dev_engine` (``pqe2ee dev-engine``), a
deterministic OpenAI-compatible stand-in engine for demos and tests. Nothing here encrypts or
serves production traffic."""
