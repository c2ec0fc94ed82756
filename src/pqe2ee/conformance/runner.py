"""Entry points: one function per role, each returning a :class:`~.model.Report`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx2

from pqe2ee.conformance.client_cases import CLIENT_CASES, PROMPT, ClientCase, Outcome, judge
from pqe2ee.conformance.hostile import Mode
from pqe2ee.conformance.loopback import OwnStack, own_stack
from pqe2ee.conformance.model import Case, CaseSkipped, Report, Result, run_cases
from pqe2ee.conformance.probe import ServerProbe
from pqe2ee.conformance.rechunk import MergingEncoder, SplittingEncoder, instance_encoder
from pqe2ee.conformance.server_cases import SERVER_CASES, server_capabilities

__all__ = ["profiles_of", "run_client", "run_server", "run_vectors"]


def profiles_of(profile: str) -> tuple[str, ...]:
    return ("v1", "v2") if profile == "both" else (profile,)


def run_server(
    url: str,
    *,
    api_key: str | None,
    model: str,
    profile: str = "both",
    models_base: str | None = None,
    only: Sequence[str] = (),
    on_result: Callable[[Result], object] | None = None,
) -> Report:
    """Run the server cases against the relay at ``url``."""
    url = url.rstrip("/")
    report = Report("server", url)
    probe = ServerProbe(url, api_key, model, models_base)
    try:
        try:
            probe.http.get("/")
        except httpx2.TransportError as exc:
            report.error = f"cannot reach {url}: {type(exc).__name__}: {exc}"
            return report
        cases = [c for c in SERVER_CASES if not only or any(c.id.startswith(o) for o in only)]
        report.results = run_cases(cases, probe, profiles=profiles_of(profile), on_result=on_result)
        report.capabilities = {**server_capabilities(probe), "discoveries": probe.discoveries}
        return report
    finally:
        probe.close()


def _missing(cmd: Sequence[str]) -> str | None:
    """Why ``cmd`` cannot be started at all (None when it can be tried)."""
    if not cmd:
        return "no adapter command given (put it after --)"
    if shutil.which(cmd[0]) is None:
        return f"cannot run the adapter: {cmd[0]!r} is not an executable file or on PATH"
    return None


def declared_capabilities(cmd: Sequence[str], timeout: float = 30.0) -> dict[str, object] | None:
    """What the adapter declares with ``CMD... --capabilities`` (a JSON object on stdout, exit
    0); None when it declares nothing (any other answer: every case is tried)."""
    import json

    try:
        done = subprocess.run(
            [*cmd, "--capabilities"], capture_output=True, text=True, timeout=timeout, check=False
        )
        doc = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _undeclared(declared: dict[str, object] | None, profile: str, case: ClientCase) -> str | None:
    if declared is None:
        return None
    profiles = declared.get("profiles")
    if isinstance(profiles, list) and profile not in profiles:
        return f"the adapter does not declare profile {profile}"
    if case.stream and declared.get("streaming") is False:
        return "the adapter declares no streaming"
    if case.calls > 1 and declared.get("multi_call") is not True:
        return "the adapter does not declare multi_call (--calls N)"
    return None


# records that split / merge inner lines: v1 via the instance's encoder, v2 via engine chunks
_ENCODERS = {Mode.INNER_SPLIT: SplittingEncoder, Mode.INNER_MERGED: MergingEncoder}
_ENGINE_MODES = {Mode.INNER_SPLIT: "split", Mode.INNER_MERGED: "merge"}


def _run_adapter(
    cmd: Sequence[str], st: OwnStack, case_id: str, case: ClientCase, timeout: float
) -> Outcome:
    args = [*cmd, "--base-url", st.relay, "--api-key", st.api_key, "--model", st.model]
    args += ["--prompt", PROMPT] + (["--stream"] if case.stream else [])
    args += ["--calls", str(case.calls)] if case.calls > 1 else []
    env = {**os.environ, "PQE2EE_CONFORMANCE_CASE": case_id}
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Outcome(None, out, "")
    return Outcome(done.returncode, done.stdout, done.stderr)


def _client_case(
    cmd: Sequence[str],
    st: OwnStack,
    case: ClientCase,
    profile: str,
    timeout: float,
    spoken: set[str],
    declared: dict[str, object] | None,
) -> Case[None]:
    case_id = f"{profile}.{case.id}"

    def run(_: None) -> str:
        why = _undeclared(declared, profile, case)
        if why is not None:
            raise CaseSkipped(why)
        st.hostile.set_mode(case.mode, hide_v2=profile == "v1")
        st.engine.mode = _ENGINE_MODES.get(case.mode)
        try:
            with instance_encoder(_ENCODERS.get(case.mode)):
                out = _run_adapter(cmd, st, case_id, case, timeout * case.calls)
        finally:
            st.engine.mode = None
        seen = list(st.hostile.seen.invokes)
        spoke_v2 = bool(seen) and seen[0].v2
        spoken.update("v2" if inv.v2 else "v1" for inv in seen)
        if profile == "v2" and seen and not spoke_v2:
            raise CaseSkipped("v2 was offered; the client spoke v1")
        return judge(case, out, seen, spoke_v2)

    return Case(case_id, case.section, profile, case.title, run)


def run_client(
    cmd: Sequence[str],
    *,
    profile: str = "both",
    only: Sequence[str] = (),
    timeout: float = 60.0,
    on_result: Callable[[Result], object] | None = None,
) -> Report:
    """Run the client cases: ``cmd`` is the adapter (docs/conformance.md), once per case, against
    our own loopback relay; with profile ``v1`` the relay offers no v2, with ``v2`` it does."""
    report = Report("client", " ".join(cmd))
    report.error = _missing(cmd)
    if report.error is not None:
        return report
    spoken: set[str] = set()
    declared = declared_capabilities(cmd, timeout)
    try:
        with own_stack() as st:
            cases = [
                _client_case(cmd, st, c, p, timeout, spoken, declared)
                for p in profiles_of(profile)
                for c in CLIENT_CASES
                if not only or any(f"{p}.{c.id}".startswith(o) for o in only)
            ]
            report.results = run_cases(
                cases, None, profiles=profiles_of(profile), on_result=on_result
            )
            st.hostile.set_mode(Mode.FAITHFUL)
    except OSError as exc:
        report.error = f"cannot run the adapter: {exc}"
        return report
    report.capabilities = {"declared": declared, "profiles_spoken": sorted(spoken)}
    return report


def run_vectors(
    cmd: Sequence[str],
    *,
    profile: str = "both",
    only: Sequence[str] = (),
    vectors: Path | None = None,
    timeout: float = 30.0,
    batch: bool = False,
    on_result: Callable[[Result], object] | None = None,
) -> Report:
    """Run the golden-vector cases through the sealer/opener adapter ``cmd``."""
    from pqe2ee.conformance.vectors_cases import default_vectors_dir, vector_cases

    report = Report("vectors", " ".join(cmd))
    report.error = _missing(cmd)
    if report.error is not None:
        return report
    directory = vectors or default_vectors_dir()
    profiles = profiles_of(profile)
    try:
        declared = declared_capabilities(cmd, timeout)
        ops = declared.get("ops") if declared is not None else None
        cases = vector_cases(
            directory,
            cmd,
            timeout=timeout,
            batch=batch,
            only=only,
            profiles=profiles,
            ops=ops if isinstance(ops, list) else None,
        )
    except OSError as exc:
        report.error = f"cannot read the vectors in {directory}: {exc}"
        return report
    try:
        report.results = run_cases(cases, None, profiles=profiles, on_result=on_result)
    except OSError as exc:
        report.error = f"cannot run the adapter: {exc}"
    ran = {".".join(r.id.split(".")[:2]) for r in report.results if r.status.value != "SKIP"}
    report.capabilities = {"declared": declared, "ops_answered": sorted(ran)}
    return report
