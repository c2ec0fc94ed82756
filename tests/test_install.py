"""The container is built the way it is tested: the Dockerfile's only install step is
scripts/install.sh, and this test runs that script in a fresh venv (from the package registry,
as a user's ``pip install`` would), then starts a server from the result. Docker itself is not
available here, so the image is never built by the suite."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from pqe2ee.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = DOCKERFILE.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word, rest.strip()))
    return out


def test_dockerfile_installs_only_through_the_script_and_sets_real_variables() -> None:
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    assert runs[0] == "sh /src/scripts/install.sh /opt/pqe2ee proxy,server,redis && rm -rf /src"
    assert all(r.startswith("useradd ") for r in runs[1:])
    known = {
        name
        for command in cli.commands.values()
        for p in command.params
        if getattr(p, "envvar", None)
        for name in ([p.envvar] if isinstance(p.envvar, str) else p.envvar)
    }
    env = [rest for word, rest in _instructions() if word == "ENV"]
    names = [item.split("=")[0] for rest in env for item in shlex.split(rest)]
    assert names and all(name in known for name in names), names
    assert ("CMD", '["proxy"]') in _instructions()


@pytest.mark.parametrize(
    ("extras", "command"),
    [("proxy,server,redis", ["dev-engine"]), ("proxy", ["proxy", "--api-key", "k"])],
    ids=["as-the-dockerfile", "as-the-readme"],
)
def test_install_script_in_a_fresh_venv_gives_a_working_command(
    tmp_path: Path, extras: str, command: list[str]
) -> None:
    """The Dockerfile's install, and the README's `pip install '.[proxy]'`: each gives a
    command that starts its server."""
    prefix = tmp_path / "opt-pqe2ee"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PQE2EE_", "PYTHON"))}
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    env["PIP_FLAGS"] = ""
    done = subprocess.run(
        ["sh", str(ROOT / "scripts" / "install.sh"), str(prefix), extras],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pqe2ee, version" in done.stdout and "auto KEM: " in done.stdout
    binary = prefix / "bin" / "pqe2ee"
    # what the image runs: the fresh install imports nothing from this checkout
    where = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", "import pqe2ee; print(pqe2ee.__file__)"],
        env=env, capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert str(prefix) in where
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(binary), *command, "--port", str(port), "--log-format", "json"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the installed {command[0]} exited"
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
