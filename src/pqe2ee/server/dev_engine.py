# TEMP-SHIM: remove after merge
"""Moved to :mod:`pqe2ee.testing.dev_engine`."""

from pqe2ee.testing.dev_engine import *  # noqa: F403
from pqe2ee.testing.dev_engine import __all__, create_app, serve  # noqa: F401
