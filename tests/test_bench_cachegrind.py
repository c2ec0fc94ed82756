"""``bench_client.py --cachegrind``'s machinery (benchmarks/_cachegrind.py) on a real valgrind
run: the worker's snapshots (a forked child that exits) leave cachegrind files the parser reads,
their difference bounds the steps between them, and the cold variant's eviction really replaces
the simulated D1 and LL and runs before every socket read. A measuring instrument: this keeps it
from silently rotting. Skipped without valgrind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _cachegrind as cg  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    sys.path.insert(0, sys.argv[1])
    from _cachegrind import worker_step

    calls = []
    ops = {"nonstream": lambda: calls.append(1) or 1}
    first = worker_step({"op": "snapshot"}, ops)
    worker_step({"op": "cold"}, ops)
    a, b = socket.socketpair()
    a.sendall(b"HTTP/1.1 200 OK\\r\\nA: b\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n")
    pieces = [b.recv(4096) for _ in range(3)]
    assert pieces[1:] == [b"5\\r\\nhello\\r\\n", b"0\\r\\n\\r\\n"], pieces
    ops["nonstream"]()
    worker_step({"op": "evict", "n": 2}, ops)
    last = worker_step({"op": "snapshot"}, ops)
    print(json.dumps([first, last, len(calls)]))
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, int]], int]:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    out = tmp_path_factory.mktemp("cg")
    cmd = [*cg.valgrind(str(out / "w.%p"), sim=True), sys.executable, "-c", SCRIPT]
    done = subprocess.run(
        [*cmd, str(ROOT / "benchmarks")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, last, calls = json.loads(done.stdout)
    return out, [first, last], calls


def test_parser_reads_real_output(run: tuple[Path, list[dict[str, int]], int]) -> None:
    out, snaps, _ = run
    prof = cg.parse(out / f"w.{snaps[0]['pid']}")
    assert prof.events[:3] == ("Ir", "I1mr", "ILmr") and "Bim" in prof.events
    # the per-function costs add up to the file's summary line
    for e in prof.events:
        assert sum(c[e] for c in prof.by_fn.values()) == prof.totals[e]
    assert prof.totals["Ir"] > 1_000_000
    assert any("ceval" in fl for fl, _ in prof.by_fn)


def test_snapshots_bound_the_cold_steps(run: tuple[Path, list[dict[str, int]], int]) -> None:
    out, (first, last), calls = run
    a, b = (cg.parse(out / f"w.{s['pid']}") for s in (first, last))
    step = cg.metrics(cg.over(b.totals, a.totals))
    # six evictions (three reads, the call, two alone), each a scan of twice the LL
    assert calls == 1
    assert last["evictions"] - first["evictions"] == 6
    assert last["reads"] - first["reads"] == 3
    lines = 6 * 2 * cg.LL_BYTES // 64
    assert lines <= step["D1 misses"] and lines <= step["LL misses"] < 2 * lines
    assert step["est. cycles"] > step["instructions"] + 100 * lines
    per_fn = cg.over(b.by_fn, a.by_fn)
    assert sum(c.get("Ir", 0) for c in per_fn.values()) == step["instructions"]


def test_parser_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("events: Ir\n10 5\n")
    with pytest.raises(ValueError):
        cg.parse(bad)
    bad.write_text("hello\n")
    with pytest.raises(ValueError):
        cg.parse(bad)


def test_pieces_as_the_server_wrote_them() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    chunk = b"1a\r\n" + b"d" * 26 + b"\r\n"
    assert cg._piece(head + chunk) == len(head)
    assert cg._piece(chunk + chunk) == len(chunk)
    assert cg._piece(chunk[:10]) == 10  # (a chunk not all there yet: what is)
    assert cg._piece(b"0\r\n\r\n" + chunk) == 5
    assert cg._piece(b'{"id": 1}') == 9  # (a body with a length: all of it)


def test_kept_units_load_back(tmp_path: Path) -> None:
    unit = cg.Unit({"Ir": 10.0}, {("a.c", "f"): {"Ir": 4.0}}, {}, {("???", "g"): {}}, (2.0, 1.0))
    saved = tmp_path / "units.json"
    saved.write_text(json.dumps({"ours-e2ee": {"cold": cg._jsonable(vars(unit))}}))
    assert cg.load(saved) == {"ours-e2ee": {"cold": unit}}
