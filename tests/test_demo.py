"""``make demo``'s script end to end (examples/demo.py): the local stack through the openai SDK,
the proxy answering the Anthropic SDK, a tampered stream refused, and the next steps - and the
Makefile's demo target asks for no reference venv, no Redis and no root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_shows_the_proxy_the_refused_tamper_and_next_steps() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PQE2EE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "answer      'Echo: Hello from the Anthropic SDK'  (stop_reason end_turn)" in out
    assert "refused     E2EEStreamDecryptError (code record_auth_failed)" in out
    assert "NOT REFUSED" not in out
    assert out.rstrip().splitlines()[-6] == "Next steps"


def test_make_demo_needs_no_reference_venv_redis_or_liboqs_build() -> None:
    done = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    assert "examples/demo.py" in plan
    for unwanted in ("chutes-e2ee", ".venv-ref", "apt-get", "redis", "build_liboqs"):
        assert unwanted not in plan, unwanted
