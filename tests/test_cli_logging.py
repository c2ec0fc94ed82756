"""``--log-format text|json``: one format for every line a command writes, uvicorn's included,
through the real binary; failures at WARNING; no key or prompt in any line."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx2
import pytest

from relay_support import KEY_A, serve_stack

PQE2EE = [sys.executable, "-m", "pqe2ee.cli"]
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


class Running:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PQE2EE_")}
        self.proc = subprocess.Popen(
            [*PQE2EE, *args], env={**clean, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} in {self.seen}")

    def stop(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        time.sleep(0.2)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    with serve_stack(1, api_keys=(KEY_A,), rate_limit=1000) as st:
        yield st.relay


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port(line: str) -> int:
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, line
    return int(match.group(1))


def test_json_lines_from_the_proxy_uvicorn_included(relay: str) -> None:
    run = Running(
        "proxy", "--port", "0", "--log-format", "json", "--api-base", relay,
        "--models-base", relay, env={"PQE2EE_PROXY_API_KEY": KEY_A},
    )  # fmt: skip
    try:
        port = _port(run.wait_for("Uvicorn running on"))
        body = {"model": "dev-echo", "messages": [{"role": "user", "content": "hush-hush"}]}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx2.post(url, json=body, timeout=30).status_code == 200
        run.wait_for("POST /v1/chat/completions 200")
    finally:
        lines = run.stop()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(d) == {"time", "level", "logger", "message"} for d in docs), docs
    assert any(d["logger"].startswith("uvicorn") for d in docs)
    assert any(d["logger"] == "pqe2ee.proxy" and d["level"] == "INFO" for d in docs)
    assert all(d["time"].endswith("Z") for d in docs)
    for secret in ("hush-hush", KEY_A):
        assert secret not in "\n".join(lines)


def test_text_lines_from_the_relay_one_format_and_a_dead_instance_at_warning() -> None:
    run = Running(
        "relay", "--port", str(free_port()), "--instance", "http://127.0.0.1:9", "--log-level", "info",
        env={"PQE2EE_RELAY_API_KEY": KEY_A},
    )  # fmt: skip
    try:
        run.wait_for("Uvicorn running on")
    finally:
        lines = run.stop()
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert any(" WARNING pqe2ee.relay: instance http://127.0.0.1:9 is unavailable" in line
               for line in lines)  # fmt: skip
    assert any(" INFO uvicorn.error: " in line for line in lines)
    assert not any("httpx2" in line for line in lines)  # per-probe lines stay below debug
