"""The real agent CLIs through ``pqe2ee proxy``, with their default tools and settings:

    claude -p / codex exec -> proxy -> (E2EE) -> relay -> instance -> dev-engine

Claude Code (npm ``@anthropic-ai/claude-code``) and Codex (npm ``@openai/codex``), pinned in
``scripts/install_clis.sh`` and installed into ``.clis/`` by ``make test`` (or by this module
when they are missing); skipped only when npm itself is missing. Each runs with a scratch
HOME / CODEX_HOME, its telemetry, update checks and plugin syncs turned off, and every
off-loopback request sent to a local sink posing as the HTTPS proxy: the tests assert that the
sink saw nothing, so a CLI that phones home fails here instead of reaching the internet.

The dev-engine's scripted tool trigger (``__tool__ NAME {json}``) makes the tool loops real:
the engine asks for the CLI's own tool, the CLI runs it, the result goes back, and the answer
("Tool said: ...") is the tool's output.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from pqe2ee.proxy.app import ProxyConfig, create_app
from servers import run_app, serve_chain

ROOT = Path(__file__).resolve().parent.parent
CLIS = Path(os.environ.get("PQE2EE_CLIS_DIR", ROOT / ".clis"))
KEY = "pk-real-cli-7a1b2c3d4e5f"
TIMEOUT = 180

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


class Sink:
    """A loopback listener posing as HTTP(S)_PROXY: records the first line of every request
    (``CONNECT host:443 ...``) and closes, so nothing leaves the machine."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(4096).split(b"\r\n")[0].decode(errors="replace"))
                except OSError:
                    self.seen.append("(no request line)")


@dataclass
class Env:
    proxy: str
    engine: str
    sink: Sink
    tmp: Path

    def base(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "HTTPS_PROXY": self.sink.url,
            "HTTP_PROXY": self.sink.url,
            "https_proxy": self.sink.url,
            "http_proxy": self.sink.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def requests(self) -> int:
        return int(httpx2.get(self.engine + "/dev/stats", timeout=10).json()["requests"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if (
        not (CLIS / "node_modules/.bin/claude").exists()
        or not (CLIS / "node_modules/.bin/codex").exists()
    ):
        subprocess.run([str(ROOT / "scripts/install_clis.sh"), str(CLIS)], check=True)
    with serve_chain(
        1,
        api_keys=(KEY,),
        rate_limit=10_000,
        nonces_per_instance=100,
        engine_kw={"max_model_len": 1_000_000},  # Claude Code asks for 32000 output tokens
    ) as chain:
        config = ProxyConfig(
            api_base=chain.relay, models_base=chain.relay, model_map=(("claude-*", "dev-echo"),)
        )
        proxy = chain.exits.enter_context(run_app(create_app(config)))
        sink = Sink()
        yield Env(proxy, chain.engine, sink, tmp_path_factory.mktemp("clis"))
        sink.sock.close()


def run(cmd: list[str], environ: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env=environ,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def workdir(env: Env, name: str) -> Path:
    path = env.tmp / name
    path.mkdir()
    (path / "note.txt").write_text("the secret word is pineapple\n")
    return path


# -- Claude Code -------------------------------------------------------------------------------


def claude(env: Env, prompt: str, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    environ = env.base(env.tmp / f"home-{name}") | {
        "ANTHROPIC_BASE_URL": env.proxy,
        "ANTHROPIC_API_KEY": KEY,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    cmd = [str(CLIS / "node_modules/.bin/claude"), "-p", prompt, *extra]
    return run(cmd, environ, workdir(env, name))


def test_claude_say_hello_with_its_own_model_id(env: Env) -> None:
    # No --model: Claude Code asks for its built-in claude-* model; --model-map serves it.
    before = env.requests()
    done = claude(env, "say hello", "claude-hello")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Echo:" in done.stdout and "say hello" in done.stdout
    assert env.requests() > before
    assert env.sink.seen == []


def test_claude_tool_loop(env: Env) -> None:
    prompt = '__tool__ Read {"file_path": "NOTE"}'
    path = env.tmp / "claude-tool" / "note.txt"
    done = claude(env, prompt.replace("NOTE", str(path)), "claude-tool", "--model", "dev-echo")
    assert done.returncode == 0, done.stdout + done.stderr
    # The engine asked for Read, Claude Code read the file, the result came back as the answer.
    assert "Tool said:" in done.stdout
    assert "the secret word is pineapple" in done.stdout
    assert env.sink.seen == []


# -- Codex -------------------------------------------------------------------------------------


def codex(env: Env, prompt: str, name: str) -> subprocess.CompletedProcess[str]:
    home = env.tmp / f"home-{name}"
    environ = env.base(home) | {"CODEX_HOME": str(home / "codex"), "PQE2EE_API_KEY": KEY}
    (home / "codex").mkdir()
    provider = (
        f'{{name="pqe2ee", base_url="{env.proxy}/v1", wire_api="responses", '
        'env_key="PQE2EE_API_KEY"}'
    )
    settings = {
        "model_provider": "pqe2ee",
        "model": "dev-echo",
        "model_providers.pqe2ee": provider,
        # off the internet: no plugin catalog sync, analytics, feedback or update check
        "features.plugins": "false",
        "analytics.enabled": "false",
        "feedback.enabled": "false",
        "check_for_update_on_startup": "false",
    }
    cmd = [str(CLIS / "node_modules/.bin/codex"), "exec", "--skip-git-repo-check"]
    for key, value in settings.items():
        cmd += ["-c", f"{key}={value}" if value[0] in "{tf" else f'{key}="{value}"']
    return run([*cmd, prompt], environ, workdir(env, name))


def test_codex_say_hello(env: Env) -> None:
    before = env.requests()
    done = codex(env, "say hello", "codex-hello")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Echo:" in done.stdout and "say hello" in done.stdout
    assert env.requests() > before
    assert env.sink.seen == []


def test_codex_tool_loop(env: Env) -> None:
    done = codex(env, '__tool__ exec_command {"cmd": "cat note.txt"}', "codex-tool")
    assert done.returncode == 0, done.stdout + done.stderr
    # The engine asked for exec_command, Codex ran it, the output came back as the answer.
    assert "Tool said:" in done.stdout
    assert "the secret word is pineapple" in done.stdout
    assert env.sink.seen == []
