"""``pqe2ee conformance``: check another implementation against SPEC.md and spec/v2.md.

Roles (one command each, see docs/conformance.md):

* ``server URL`` — a relay and its instances, live on the wire (:mod:`.server_cases`);
* ``client -- CMD...`` — a client, run through a small adapter against a loopback relay of
  ours that answers faithfully and then hostilely (:mod:`.client_cases`, :mod:`.hostile`);
* ``vectors -- CMD...`` — a sealer/opener, fed the golden vectors through a JSON-in/JSON-out
  contract (:mod:`.vectors_cases`).

Cases are data with the section each checks (:mod:`.model`); results render as text, JSON or
Markdown, and the exit code follows tinfoil-conformance (0 pass, 10 fail, 20 unsupported,
30 malformed, 1 error). The entry points are in :mod:`.runner`; this package imports nothing
else, so the adapters shipped here (``python -m pqe2ee.conformance.adapter``,
``python -m pqe2ee.conformance.vectors_adapter``) start fast.
"""
