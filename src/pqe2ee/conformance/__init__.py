"""``pqe2ee conformance``: check another implementation against SPEC.md and spec/v2.md.

Roles (one command each, see docs/conformance.md):

* ``server URL`` — a relay and its instances, live on the wire (:mod:`.server_cases`);
* ``client -- CMD...`` — a client, run through a small adapter against a loopback relay of
  ours that answers faithfully and then hostilely (:mod:`.client_cases`).

Cases are data with the section each checks (:mod:`.model`); results render as text, JSON or
Markdown, and the exit code follows tinfoil-conformance (0 pass, 10 fail, 20 unsupported,
30 malformed, 1 error).
"""

from __future__ import annotations

from pqe2ee.conformance.model import Case, Report, Result, Status
from pqe2ee.conformance.runner import run_server

__all__ = ["Case", "Report", "Result", "Status", "run_server"]
