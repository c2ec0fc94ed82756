"""Wire profile v1 (SPEC.md), as the reference runtime speaks it: ML-KEM-768 envelopes
(:mod:`~pqe2ee.protocol.v1.envelope`) and the v1 stream (:mod:`~pqe2ee.protocol.v1.stream`).

Keys come from :mod:`pqe2ee.protocol.kdf`, the events shared with v2 from
:mod:`pqe2ee.protocol._events`; every public name is exported by :mod:`pqe2ee.protocol`.
"""
