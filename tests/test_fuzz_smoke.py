"""A short fuzz smoke (issue 16): every target of fuzz/targets.py over its saved corpus (seeded
from the golden vectors) and over random and mutated inputs, in-process; then the atheris driver
itself for a few thousand runs of one target. `make fuzz` is the long run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

NAMES = sorted(targets.TARGETS)


def test_every_target_has_a_seeded_corpus() -> None:
    assert len(NAMES) >= 11
    for name in NAMES:
        files = targets.corpus_files(name)
        assert files, f"fuzz/corpus/{name} is empty (python fuzz/run.py --write-seeds)"


@pytest.mark.parametrize("name", NAMES)
def test_target_survives_its_corpus(name: str) -> None:
    one: Callable[[bytes], None] = targets.TARGETS[name]
    for path in targets.corpus_files(name):
        one(path.read_bytes())


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_target_survives_random_and_mutated_input(name: str, data: st.DataObject) -> None:
    one = targets.TARGETS[name]
    seeds = [p.read_bytes() for p in targets.corpus_files(name)]
    seed = data.draw(st.sampled_from(seeds))
    cut = data.draw(st.integers(0, len(seed)))
    flip = data.draw(st.integers(0, max(0, len(seed) - 1)))
    noise = data.draw(st.binary(max_size=64))
    mutated = bytearray(seed[:cut] + noise + seed[cut:])
    if mutated:
        mutated[flip % len(mutated)] ^= 0xFF
    one(bytes(mutated))
    one(data.draw(st.binary(max_size=512)))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_driver_runs_a_target(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "v2_header", "-runs=3000", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PYTHONPATH": str(FUZZ.parent / "src"),
            "PATH": "/usr/bin:/bin",
            "PQE2EE_FUZZ_CORPUS": str(tmp_path),  # never grow the saved corpus from a test
        },
        cwd=tmp_path,  # (a crash file would land here)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done 3000 runs" in proc.stderr
