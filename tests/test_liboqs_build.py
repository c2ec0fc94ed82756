"""liboqs for real: the local build (scripts/build_liboqs.sh, ``make liboqs``), the backend on it,
and a machine without it.

``make test`` builds liboqs into .liboqs/ when the backend does not load otherwise and runs pytest
with ``OQS_INSTALL_PATH`` and ``PQE2EE_REQUIRE_LIBOQS=1``: then every liboqs test here must run
(a missing library fails instead of skipping). Elsewhere the liboqs tests skip with the adapter's
reason. The vector and cross-backend suites (test_backends_vectors.py, test_golden_vectors.py) run
on liboqs as soon as it loads; this file adds what they leave to a fallback: that liboqs really
derandomises encapsulation (ACVP, and the committed spec/vectors/v1.json) and that the protocol
interoperates with liboqs on either side.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import load_vectors, vectors_dir
from pqe2ee.backends import get_aead, get_kem, unavailable_reason
from pqe2ee.backends.base import KEM
from pqe2ee.protocol import open_request, open_response, seal_request, seal_response

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_liboqs.sh"


def _liboqs() -> KEM:
    reason = unavailable_reason("liboqs")
    if reason is not None:
        if os.environ.get("PQE2EE_REQUIRE_LIBOQS") == "1":
            pytest.fail(f"PQE2EE_REQUIRE_LIBOQS=1 but {reason}")
        pytest.skip(reason)
    return get_kem("liboqs")


def _run_script(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ------------------------------------------------------------------------------------------------
# the build script


def test_build_fails_fast_without_the_tarball(tmp_path: Path) -> None:
    started = time.monotonic()
    done = _run_script(tmp_path / "no-such-liboqs.tar.xz", tmp_path / "prefix")
    assert done.returncode == 1
    assert "no-such-liboqs.tar.xz not found" in done.stderr
    assert "make liboqs SRC=" in done.stderr
    assert not (tmp_path / "prefix").exists()
    assert time.monotonic() - started < 10


def _fake_source(tmp_path: Path, marker: str, *, broken: bool = False) -> Path:
    """A tarball shaped like liboqs's: one top folder with a CMake project installing lib/marker."""
    tree = tmp_path / "src" / "liboqs-fake"
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "marker").write_text(marker)
    (tree / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.10)\nproject(fake NONE)\n"
        "install(FILES marker DESTINATION lib)\n" + ('message(FATAL_ERROR "broken")\n' * broken)
    )
    tarball = tmp_path / "liboqs-fake.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(tree, arcname=tree.name)
    return tarball


needs_build_tools = pytest.mark.skipif(
    not (shutil.which("cmake") and shutil.which("ninja") and shutil.which("xz")),
    reason="cmake, ninja or xz missing (make liboqs installs them)",
)


@needs_build_tools
def test_build_is_stamped_and_rebuilds_only_for_a_new_tarball(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    tarball = _fake_source(tmp_path, "one")

    first = _run_script(tarball, prefix)
    assert first.returncode == 0, first.stderr + first.stdout
    assert (prefix / "lib" / "marker").read_text() == "one"
    built_at = (prefix / ".stamp").stat().st_mtime_ns

    again = _run_script(tarball, prefix)  # `make liboqs` a second time
    assert again.returncode == 0
    assert "up to date" in again.stdout
    assert (prefix / ".stamp").stat().st_mtime_ns == built_at

    tarball = _fake_source(tmp_path, "two")  # a new source: built again, old files gone
    (prefix / "lib" / "stale").write_text("")
    rebuilt = _run_script("--if-missing", tarball, prefix)
    assert rebuilt.returncode == 0, rebuilt.stderr + rebuilt.stdout
    assert (prefix / "lib" / "marker").read_text() == "two"
    assert not (prefix / "lib" / "stale").exists()

    tarball.unlink()  # `make test` keeps a build whose tarball is gone; `make liboqs` refuses
    kept = _run_script("--if-missing", tarball, prefix)
    assert kept.returncode == 0
    assert "using the build" in kept.stdout
    assert _run_script(tarball, prefix).returncode == 1


@needs_build_tools
def test_a_failed_build_is_not_stamped_and_is_redone(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    failed = _run_script(_fake_source(tmp_path, "one", broken=True), prefix)
    assert failed.returncode == 1
    assert "the build failed" in failed.stderr and "broken" in failed.stderr
    assert not (prefix / ".stamp").exists()
    fixed = _run_script(_fake_source(tmp_path, "one"), prefix)
    assert fixed.returncode == 0, fixed.stderr
    assert (prefix / ".stamp").exists() and not (prefix / ".partial").exists()


def test_build_never_deletes_a_prefix_it_did_not_make(tmp_path: Path) -> None:
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "precious").write_text("")
    done = _run_script(_fake_source(tmp_path, "one"), prefix)
    assert done.returncode == 1
    assert "was not made by" in done.stderr
    assert (prefix / "precious").exists()


# ------------------------------------------------------------------------------------------------
# a machine without liboqs


def _without_liboqs(tmp_path: Path) -> dict[str, str]:
    if ctypes.util.find_library("oqs"):
        pytest.skip("a system liboqs is installed: cannot hide it")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PQE2EE_REQUIRE_LIBOQS"}
    env.update(
        OQS_INSTALL_PATH=str(empty),
        HOME=str(empty),
        PQE2EE_VECTORS=str(vectors_dir()),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


def test_without_liboqs_the_backend_is_unavailable_and_nothing_is_downloaded(
    tmp_path: Path,
) -> None:
    code = (
        "import sys\n"
        "from pqe2ee.backends import available, get_kem, unavailable_reason\n"
        "reason = unavailable_reason('liboqs')\n"
        "assert reason and 'not found' in reason, reason\n"
        "assert 'liboqs' not in available() and get_kem().name != 'liboqs'\n"
        "assert 'oqs' not in sys.modules\n"  # importing oqs would start its installer
        "print(reason)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_without_liboqs(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "liboqs shared library not found" in done.stdout


def test_without_liboqs_make_test_builds_it(tmp_path: Path) -> None:
    """--if-missing (make test) probes, finds nothing, so needs the tarball (missing here)."""
    done = _run_script(
        "--if-missing", tmp_path / "none.tar.xz", tmp_path / "prefix", env=_without_liboqs(tmp_path)
    )
    assert done.returncode == 1
    assert "none.tar.xz not found" in done.stderr


def test_without_liboqs_the_suite_skips_with_the_reason(tmp_path: Path) -> None:
    args = ["tests/test_backends_vectors.py", "-k", "test_acvp_encapsulation and liboqs"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
        cwd=ROOT,
        env=_without_liboqs(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b\d+ skipped", done.stdout)
    assert "passed" not in done.stdout and "failed" not in done.stdout
    assert "liboqs shared library not found" in done.stdout


# ------------------------------------------------------------------------------------------------
# the backend on liboqs


def test_liboqs_loads_with_every_operation() -> None:
    kem = _liboqs()
    from pqe2ee.backends.liboqs import liboqs_path, liboqs_version  # only importable with liboqs

    assert get_kem("auto").name == "liboqs"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", liboqs_version())
    assert Path(liboqs_path()).exists()
    key = kem.from_seed(bytes(range(64)))  # seed keygen (liboqs >= 0.12): vectors need it
    assert key.seed() == bytes(range(64))
    ct, ss = kem.encapsulate_derand(key.public_key, bytes(32))  # not the "unsupported" fallback
    assert key.decapsulate(ct) == ss


def test_a_liboqs_that_loads_is_not_built_again(tmp_path: Path) -> None:
    _liboqs()
    done = _run_script(
        "--if-missing",
        tmp_path / "none.tar.xz",
        tmp_path / "prefix",
        env={"PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stderr
    assert "already loads" in done.stdout
    assert not (tmp_path / "prefix").exists()


def _acvp_encapsulations() -> list[tuple[str, str, str, str]]:
    prompt = load_vectors("acvp/ML-KEM-encapDecap-FIPS203.ML-KEM-768.prompt.json")
    expected = load_vectors("acvp/ML-KEM-encapDecap-FIPS203.ML-KEM-768.expectedResults.json")
    results = {(g["tgId"], t["tcId"]): t for g in expected["testGroups"] for t in g["tests"]}
    return [
        (t["ek"], t["m"], results[g["tgId"], t["tcId"]]["c"], results[g["tgId"], t["tcId"]]["k"])
        for g in prompt["testGroups"]
        if g["function"] == "encapsulation"
        for t in g["tests"]
    ]


def test_liboqs_derandomised_encapsulation_matches_acvp() -> None:
    kem = _liboqs()
    cases = _acvp_encapsulations()
    assert len(cases) == 25
    for ek, m, c, k in cases:
        assert kem.encapsulate_derand(bytes.fromhex(ek), bytes.fromhex(m)) == (
            bytes.fromhex(c),
            bytes.fromhex(k),
        )


def test_liboqs_reproduces_the_golden_vectors_encapsulations() -> None:
    """spec/vectors/v1.json was made with pycryptodome's Encaps_internal; liboqs agrees."""
    kem = _liboqs()
    vectors: dict[str, Any] = json.loads((ROOT / "spec" / "vectors" / "v1.json").read_text())
    assert vectors["reproducible"]
    for vec in vectors["request"]:
        ek, coins = bytes.fromhex(vec["instance_public_key"]), bytes.fromhex(vec["encaps_coins"])
        ct, ss = kem.encapsulate_derand(ek, coins)
        assert (ct.hex(), ss.hex()) == (vec["kem_ciphertext"], vec["shared_secret"])


@pytest.mark.parametrize("other", ["pyca", "pycryptodome", "pqcrypto"])
@pytest.mark.parametrize("liboqs_side", ["client", "instance"])
def test_protocol_interop_with_liboqs(other: str, liboqs_side: str) -> None:
    """A sealed request and its sealed response, liboqs on one side and ``other`` on the other."""
    liboqs = _liboqs()
    reason = unavailable_reason(other)
    if reason is not None:
        pytest.skip(reason)
    client, instance = (
        (liboqs, get_kem(other)) if liboqs_side == "client" else (get_kem(other), liboqs)
    )
    aead = get_aead("pyca")
    instance_key = instance.generate()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    sealed = seal_request(
        body, instance_key.public_key, response_key=client.generate(), kem=client, aead=aead
    )
    opened = open_request(sealed.blob, instance_key, aead=aead)
    assert opened.body == body
    reply = b'{"choices":[{"message":{"content":"hello"}}]}'
    blob = seal_response(reply, opened.response_public_key, kem=instance, aead=aead)
    assert open_response(blob, sealed.response_key, aead=aead) == reply


def test_liboqs_encapsulation_uses_one_descriptor_and_its_own_key_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encapsulation makes no per-call ``KeyEncapsulation``, and a key failing the FIPS 203
    modulus check is refused with the precise error whether we or liboqs check it."""
    kem = _liboqs()
    from pqe2ee.backends import liboqs as adapter
    from pqe2ee.errors import ErrorCode, LocalProtocolError

    assert adapter._CHECKS_MODULUS  # liboqs 0.16 checks the key itself (probed at import)
    public_key = kem.generate().public_key
    unreduced = b"\xff\x0f" + public_key[2:]  # first coefficient 4095 >= q
    for ours in (False, True):
        monkeypatch.setattr(adapter, "_CHECKS_MODULUS", not ours)
        with pytest.raises(LocalProtocolError, match="modulus check") as info:
            kem.encapsulate(unreduced)
        assert info.value.code is ErrorCode.INVALID_KEY
    monkeypatch.setattr(adapter._oqs, "KeyEncapsulation", None)  # any use would raise
    ct, ss = kem.encapsulate(public_key)
    assert len(ct) == 1088 and len(ss) == 32


def test_liboqs_keys_are_buffers_of_ours_and_wiping_cleanses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Key generation (random, seeded, imported) and decapsulation make no per-key
    ``KeyEncapsulation``, agree with another backend, and a wiped key's buffer is zeroed."""
    kem = _liboqs()
    from pqe2ee.backends import liboqs as adapter
    from pqe2ee.errors import LocalProtocolError

    assert adapter._DIRECT_KEYS  # liboqs 0.16 exports keypair, decaps and cleanse
    monkeypatch.setattr(adapter._oqs, "KeyEncapsulation", None)  # any use would raise
    other = get_kem("pycryptodome") if unavailable_reason("pycryptodome") is None else kem
    seed = bytes(range(64))
    for key in (kem.generate(), kem.from_seed(seed)):
        ct, ss = other.encapsulate(key.public_key)
        assert key.decapsulate(ct) == ss
        expanded = key.expanded_key()
        assert expanded is not None and len(expanded) == 2400
        again = kem.from_expanded(expanded)
        assert again.public_key == key.public_key and again.decapsulate(ct) == ss
        buffer = key._key  # the ctypes buffer itself
        key.wipe()
        assert buffer.raw == bytes(2400) and key.expanded_key() is None
        with pytest.raises(LocalProtocolError, match="wiped"):
            key.decapsulate(ct)
    assert kem.from_seed(seed).public_key == other.from_seed(seed).public_key
