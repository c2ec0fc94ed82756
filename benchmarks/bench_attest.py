"""Attestation cost: per-instance verification time, and the latency attestation adds to a
client's first request to a chute (and to the requests after it).

Run by hand (not part of the test suite)::

    PQE2EE_ATTESTATION=../shared/attestation .venv/bin/python benchmarks/bench_attest.py [--rounds N]

Part 1 verifies every instance of every capture in ../shared/attestation at its capture time
(the production verifier: dcap-qvl with Intel's root, the pinned NVIDIA root) and prints the
median time per instance: the whole verdict cold (no certificate link verified before in the
process) and warm (the same evidence again: every GPU chain link is then remembered, only the
8 SPDM signatures are checked), the TDX part alone (``gpu=off``) and the cold GPU part.

Part 2 runs the replay relay of the tests (a real uvicorn server on loopback serving a
capture's model listing, discovery, evidence; ``/e2e/invoke`` answers 500 at once) and times,
with a fresh httpx2 ``E2EETransport`` per round, the first request and the next ones, with
``attest="off"`` and with attestation (the capture's nonce and time). The difference of the
first request is the evidence round trip plus verification of the leased instance; the second
request (the pool leases the capture's other instance) verifies it from the evidence already
fetched (no round trip); later requests reuse the verdicts.
Rounds alternate the two clients; medians are printed with their same-run ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import httpx2  # noqa: E402

from attest_replay import MODEL, Replay  # noqa: E402
from attest_support import ATTESTATION, CAPTURES, EXTRA, capture, full_collateral  # noqa: E402
from pqe2ee.attest import GpuMode, Policy, verify_instance  # noqa: E402
from pqe2ee.attest.gate import AttestOptions  # noqa: E402
from pqe2ee.attest.gpu import _issued_by  # noqa: E402
from pqe2ee.attest.tdx import load_qvl  # noqa: E402
from pqe2ee.transports.httpx2 import E2EETransport  # noqa: E402
from servers import run_app  # noqa: E402

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.2f}"


def part1(rounds: int) -> None:
    qvl = load_qvl()
    print("Per-instance verification (median of", rounds, "runs, ms)")
    print(
        f"{'capture':24} {'instance':10} {'gpus':>4} {'cold':>8} {'warm':>8} {'tdx only':>8}"
        f" {'gpu cold':>8}"
    )
    for path in CAPTURES:
        cap = capture(path.name)
        coll = full_collateral(cap)
        now = cap.captured_at.timestamp()
        for iid, key in cap.instances.items():
            entry = cap.evidence.entries.get(iid)
            cold, warm, tdx = [], [], []
            for _ in range(rounds):
                _issued_by.cache_clear()  # cold: no certificate link verified before
                t = time.perf_counter()
                v = verify_instance(iid, key, entry, cap.nonce_hex, coll, Policy(), now, qvl=qvl)
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                verify_instance(iid, key, entry, cap.nonce_hex, coll, Policy(), now, qvl=qvl)
                warm.append(time.perf_counter() - t)
                t = time.perf_counter()
                verify_instance(
                    iid, key, entry, cap.nonce_hex, coll, Policy(gpu=GpuMode.OFF), now, qvl=qvl
                )
                tdx.append(time.perf_counter() - t)
            assert v.trusted, v.reasons
            gpu = [c - d for c, d in zip(cold, tdx, strict=True)]
            print(
                f"{path.name:24} {iid[:8]:10} {v.gpus_checked:>4} {_ms(cold)} {_ms(warm)}"
                f" {_ms(tdx)} {_ms(gpu)}"
            )


def _client_round(base: str, attest: AttestOptions | str, calls: int) -> list[float]:
    transport = E2EETransport(
        api_key="cpk_bench", api_base=base, models_base=base, attest=attest, max_attempts=1
    )
    out = []
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        for _ in range(calls):
            t = time.perf_counter()
            r = client.post("/v1/chat/completions", json=BODY)
            out.append(time.perf_counter() - t)
            assert r.status_code == 500
    return out


def part2(rounds: int, calls: int) -> None:
    name = "glm-5-tee-2026-06-29"
    cap = capture(name)
    rp = Replay(
        ATTESTATION / "chutes" / name, extra=[EXTRA / "tcb-info-b0c06f000000-2026-06-29.meta.json"]
    )
    first: dict[str, list[float]] = {"off": [], "attest": []}
    second: dict[str, list[float]] = {"off": [], "attest": []}
    later: dict[str, list[float]] = {"off": [], "attest": []}
    with run_app(rp.app()) as base:
        for i in range(rounds):
            for kind in ("off", "attest") if i % 2 == 0 else ("attest", "off"):
                attest: AttestOptions | str = (
                    "off"
                    if kind == "off"
                    else AttestOptions(
                        collateral=full_collateral(cap),
                        pcs_url=None,
                        wall_clock=lambda: cap.captured_at.timestamp(),
                        nonce_factory=lambda: cap.nonce_hex,
                    )
                )
                _issued_by.cache_clear()  # each round starts cold, like a new process
                times = _client_round(base, attest, calls)
                first[kind].append(times[0])
                second[kind].append(times[1])
                later[kind].extend(times[2:])
    print()
    print(
        f"Client latency over the replay relay on loopback ({rounds} rounds, {calls} calls each; ms)"
    )
    print(f"{'':28} {'attest=off':>10} {'attested':>10} {'added':>8} {'ratio':>6}")
    rows = (
        ("first request to the chute", first),
        ("second (other instance)", second),
        ("requests 3+ (cached)", later),
    )
    for label, data in rows:
        off, on = statistics.median(data["off"]), statistics.median(data["attest"])
        print(
            f"{label:28} {off * 1000:10.2f} {on * 1000:10.2f} {(on - off) * 1000:8.2f} {on / off:6.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "15")))
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    part1(args.rounds)
    part2(args.rounds, args.calls)


if __name__ == "__main__":
    main()
