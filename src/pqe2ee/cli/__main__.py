"""``python -m pqe2ee.cli``: the same as the ``pqe2ee`` command."""

import sys

from pqe2ee.cli import main

sys.exit(main())
