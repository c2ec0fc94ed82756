"""Run one fuzz target under atheris (libFuzzer), or refresh the saved seed corpus.

    python fuzz/run.py TARGET [libFuzzer flags, e.g. -max_total_time=60 -runs=1000]
    python fuzz/run.py --write-seeds        # fuzz/corpus/<target>/seed-* from the vectors
    python fuzz/run.py --list

The corpus directory fuzz/corpus/TARGET is read and grown (new inputs libFuzzer finds are
saved there; commit the interesting ones). A crash writes crash-* in the working directory.
`make fuzz` runs every target for FUZZ_SECONDS each. Run with PYTHONPATH=src.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_seeds(targets: ModuleType) -> None:
    for name in targets.TARGETS:
        d = targets.CORPUS / name
        d.mkdir(parents=True, exist_ok=True)
        for data in targets.seeds(name):
            (d / f"seed-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)
        print(f"{name}: {len(list(d.iterdir()))} corpus files")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0].startswith("--"):
        import targets

        if args == ["--write-seeds"]:
            write_seeds(targets)
        else:
            print("\n".join(targets.TARGETS))
        return
    name, flags = args[0], args[1:]
    import atheris

    with atheris.instrument_imports(include=["pqe2ee"]):
        import targets  # what it imports of pqe2ee is instrumented (coverage feedback)

        for warm in targets.TARGETS.values():  # each target's modules, under the hook
            warm(b"")
    one = targets.TARGETS[name]
    # PQE2EE_FUZZ_CORPUS: another corpus root (the test smoke fuzzes into a temporary one)
    corpus = Path(os.environ.get("PQE2EE_FUZZ_CORPUS") or targets.CORPUS) / name
    corpus.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
