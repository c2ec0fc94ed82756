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

Part 3 (GPU mode ``nras``): the pure token check of an NRAS answer for 8 GPUs (NVIDIA's real
captured answer and JWKS: 9 ES384 signatures; and the tests' stand-in answer, all passing), and
the first request of a client with ``gpu="verify"`` against ``gpu="nras"`` (the stand-in NRAS
on loopback: one POST and one JWKS fetch more, 9 token signatures instead of 8 SPDM ones and
their chains).
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

from attest_nras import StandInNras, gpu_claims, jwk, nras_answer  # noqa: E402
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


def part3(rounds: int) -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric import ec

    from pqe2ee.attest.nras import check_nras, parse_jwks

    name = "glm-5-tee-2026-06-29"
    folder = ATTESTATION / "chutes" / name
    cap = capture(name)
    now = cap.captured_at.timestamp()
    real = (folder / "nvidia-nras-answer.body").read_bytes()
    real_keys = parse_jwks((folder / "nvidia-nras-jwks.body").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    keys = parse_jwks(json.dumps({"keys": [jwk(key)]}).encode())
    h = bytes(range(32))
    ok = json.dumps(
        nras_answer(key, h.hex(), [gpu_claims(h.hex(), now, True) for _ in range(8)], now)
    ).encode()
    times: dict[str, list[float]] = {"real": [], "ok": []}
    for _ in range(rounds):
        t = time.perf_counter()
        check_nras(real, real_keys, bytes.fromhex(cap.nonce_hex), 8, now)
        times["real"].append(time.perf_counter() - t)
        t = time.perf_counter()
        assert all(c.ok for c in check_nras(ok, keys, h, 8, now))
        times["ok"].append(time.perf_counter() - t)
    print()
    print("GPU mode nras: token checks for 8 GPUs (median ms)")
    print(f"  NVIDIA's captured answer (9 tokens)  {_ms(times['real'])}")
    print(f"  stand-in answer, all passing         {_ms(times['ok'])}")

    rp = Replay(folder, extra=[EXTRA / "tcb-info-b0c06f000000-2026-06-29.meta.json"])
    nras = StandInNras(clock=now)
    first: dict[str, list[float]] = {"verify": [], "nras": []}
    with run_app(rp.app()) as base, run_app(nras.app()) as nras_base:
        for _ in range(rounds):
            for mode in ("verify", "nras"):
                options = AttestOptions(
                    policy=Policy(gpu=GpuMode(mode)),
                    collateral=full_collateral(cap),
                    pcs_url=None,
                    wall_clock=lambda: now,
                    nonce_factory=lambda: cap.nonce_hex,
                    nras_url=nras_base + "/v3/attest/gpu",
                    nras_jwks_url=nras_base + "/.well-known/jwks.json",
                )
                first[mode].append(_client_round(base, options, 1)[0])
    v, n = statistics.median(first["verify"]), statistics.median(first["nras"])
    print(f"  first request, gpu=verify            {v * 1000:8.2f}")
    print(f"  first request, gpu=nras (loopback)   {n * 1000:8.2f}   ratio {n / v:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "15")))
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    part1(args.rounds)
    part2(args.rounds, args.calls)
    part3(args.rounds)


if __name__ == "__main__":
    main()
