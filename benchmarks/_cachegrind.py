"""Valgrind runs of ``bench_client.py``'s client workers (``--instructions N``, ``--cachegrind N``):
deterministic counts per non-stream call and per streamed event, warm and *cold*.

One worker process per client runs under ``valgrind --tool=cachegrind``. Between its steps the
worker forks a child that exits at once: valgrind writes the child's counters (a copy of the
parent's at the fork) to ``<kind>.<pid>``, so consecutive snapshots bound each step, with its
per-function costs, in one run (cachegrind 3.19 has no start/stop requests).

Paced reads (``--cachegrind``): a client under valgrind reads far later than the engine writes,
so the worker's ``socket.socket.recv`` (what httpx/httpcore and httpx2/httpcore2 call) returns
one piece as a server wrote it at a time, a response head or one chunk of a chunked body, as a
paced stream's client gets it: the same reads on any box, however loaded. The cold variant:
after its warm steps the worker also *evicts* before every call and before every socket read,
as a client that waited for each event: it scans a buffer twice the simulated LL (every D1 and
LL line replaced) and then runs a fixed piece of unrelated Python (json, sorting; the I1 and
branch predictors get other work). A last step runs K evictions
alone; their cost per eviction is taken off every step, per function too, so what is left is
each client's own work started cold. The same code evicts for every client, so E2EE − plain
cancels what is left of it.

This module imports only the standard library at the top: the worker (our venv or the
reference's) imports it to answer the ``snapshot``, ``paced``, ``cold`` and ``evict`` steps.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The simulated caches, fixed (valgrind would copy the host's: this VM reports a 320 MB L3).
LL_BYTES = 2 * 1024 * 1024
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", f"--LL={LL_BYTES},16,64")
#: How much slower a worker runs under valgrind (at least): our transport's clocks (its own and
#: its attestation's) run this much slower there, so what it does once a minute (nonces expire,
#: a chute without evidence is asked again) it does not do every few calls; and the relay's
#: nonces last an hour (:data:`LONG_NONCES`): the floor and the reference keep nonces too.
SLOWDOWN = 50
#: ``pqe2ee`` run with relay nonces that last an hour (the relay's options, not its flags).
LONG_NONCES = """
import sys
import pqe2ee.server.relay as relay
from pqe2ee.cli import main
made = relay.RelayConfig
relay.RelayConfig = lambda **kw: made(nonce_expires_in=3600, nonce_store_ttl=3600, **kw)
sys.argv[0] = "pqe2ee"
sys.exit(main())
"""
#: The estimated-cycles model (a labelled estimate, not a measurement).
CYCLES_MODEL = "instr + 10 × (I1 + D1 misses) + 100 × LL misses + 15 × mispredicted branches"
METRICS = ("instructions", "I1 misses", "D1 misses", "LL misses", "mispredicts", "est. cycles")


def valgrind(out_pattern: str, sim: bool) -> tuple[str, ...]:
    """The command prefix: cachegrind writing to ``out_pattern`` (with ``%p``); caches and
    branches simulated when ``sim``, instructions only otherwise (faster)."""
    what = ("--cache-sim=yes", "--branch-sim=yes", *CACHES) if sim else ("--cache-sim=no",)
    return ("valgrind", "--tool=cachegrind", *what, f"--cachegrind-out-file={out_pattern}")


# --------------------------------------------------------------------------------------------
# cachegrind output


@dataclass
class Profile:
    """One cachegrind output file: event names, totals, and costs per (file, function)."""

    events: tuple[str, ...]
    totals: dict[str, int]
    by_fn: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)


def parse(path: str | Path) -> Profile:
    """Reads a cachegrind output file (``events:``, ``fl=``, ``fn=``, per-line cost lines,
    ``summary:``); a cost line may leave out trailing zero counts."""
    events: tuple[str, ...] = ()
    rows: dict[tuple[str, str], list[int]] = {}
    summary: list[int] | None = None
    fl, cur = "???", None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line[:1].isdigit():
                if cur is None:
                    raise ValueError(f"{path}: a cost line before any fn=")
                for i, v in enumerate(line.split()[1:]):
                    cur[i] += int(v)
            elif line.startswith("fl="):
                fl = line[3:].rstrip("\n")
            elif line.startswith("fn="):
                cur = rows.setdefault((fl, line[3:].rstrip("\n")), [0] * len(events))
            elif line.startswith("events:"):
                events = tuple(line.split()[1:])
            elif line.startswith("summary:"):
                summary = [int(v) for v in line.split()[1:]]
    if not events or summary is None:
        raise ValueError(f"{path}: not a cachegrind output file")
    totals = dict(zip(events, summary, strict=False))
    return Profile(events, totals, {k: dict(zip(events, v, strict=True)) for k, v in rows.items()})


def metrics(c: dict[str, float]) -> dict[str, float]:
    """The reported metrics of one set of cachegrind counts (absent events count 0)."""
    g = c.get
    out = {
        "instructions": g("Ir", 0),
        "I1 misses": g("I1mr", 0),
        "D1 misses": g("D1mr", 0) + g("D1mw", 0),
        "LL misses": g("ILmr", 0) + g("DLmr", 0) + g("DLmw", 0),
        "mispredicts": g("Bcm", 0) + g("Bim", 0),
    }
    out["est. cycles"] = (
        out["instructions"]
        + 10 * (out["I1 misses"] + out["D1 misses"])
        + 100 * out["LL misses"]
        + 15 * out["mispredicts"]
    )
    return out


Costs = dict[str, float]
FnCosts = dict[tuple[str, str], Costs]


def _lin(pairs: list[tuple[float, dict[Any, Any]]]) -> dict[Any, Any]:
    """Σ weight × counts, for flat counts (event -> n) or per function ((fl, fn) -> counts)."""
    out: dict[Any, Any] = {}
    for w, d in pairs:
        for k, v in d.items():
            if isinstance(v, dict):
                acc = out.setdefault(k, {})
                for e, n in v.items():
                    acc[e] = acc.get(e, 0.0) + w * n
            else:
                out[k] = out.get(k, 0.0) + w * v
    return out


# --------------------------------------------------------------------------------------------
# worker side (runs in the client's process, either venv)

_STATE = {"evictions": 0, "reads": 0, "cold": 0}
_BUFFER: list[bytes] = []


def _scrub() -> None:
    """A fixed piece of unrelated Python work (the same every time, for every client)."""
    doc = {f"k{i}": [i, str(i) * 3, {"v": i / 7, "w": [None, True]}] for i in range(12)}
    text = json.dumps(doc, sort_keys=True)
    back = json.loads(text)
    sorted(back.items(), key=lambda kv: kv[1][1])
    " ".join(text.split(",")[::3]).upper().count("K")


def evict() -> None:
    """Replaces every simulated D1 and LL line (a scan of twice the LL), then runs
    :func:`_scrub`."""
    if not _BUFFER:
        _BUFFER.append(b"\0" * (2 * LL_BYTES))
    _BUFFER[0].find(b"\1")
    _scrub()
    _STATE["evictions"] += 1


_RECV = socket.socket.__mro__[1].recv  # (the C method that socket.socket inherits)


def _piece(data: bytes) -> int:
    """How much of ``data`` (bytes waiting on a socket) is one piece as the server wrote it:
    a response head, or one chunk of a chunked body; all of it otherwise."""
    if data.startswith(b"HTTP/"):
        end = data.find(b"\r\n\r\n")
        return end + 4 if end >= 0 else len(data)
    line = data.find(b"\r\n", 0, 18)
    try:
        size = int(data[:line], 16) if line > 0 else -1
    except ValueError:
        size = -1
    return min(len(data), line + size + 4) if size >= 0 else len(data)


def _paced_recv(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    """``recv`` that returns one piece (:func:`_piece`) at a time, as a client reading a
    paced stream gets it, however late it reads; evicting first when cold."""
    if _STATE["cold"]:
        evict()
    _STATE["reads"] += 1
    waiting: bytes = _RECV(sock, size, flags | socket.MSG_PEEK)
    return _RECV(sock, _piece(waiting) if waiting else size, flags)  # type: ignore[no-any-return]


def worker_step(cmd: dict[str, Any], ops: dict[str, Callable[[], int]]) -> dict[str, Any]:
    """The worker's answer to ``snapshot`` (fork a child that exits: valgrind writes the
    counters so far), ``paced`` (socket reads one piece at a time from now on), ``cold``
    (and evict before every call in ``ops`` and every socket read) and ``evict`` (``n``
    evictions alone)."""
    op = cmd["op"]
    if op == "snapshot":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return {"pid": pid, **_STATE}
    if op in ("paced", "cold"):
        socket.socket.recv = _paced_recv  # type: ignore[method-assign,assignment]
    if op == "cold" and not _STATE["cold"]:
        _STATE["cold"] = 1
        for name, fn in list(ops.items()):
            ops[name] = lambda fn=fn: (evict(), fn())[1]  # type: ignore[misc]
    if op == "evict":
        for _ in range(cmd["n"]):
            evict()
    if op not in ("paced", "cold", "evict"):
        raise ValueError(op)
    return {}


# --------------------------------------------------------------------------------------------
# driver side (our venv)


@dataclass
class Step:
    """What one step of a worker cost: counts, per function, and what the worker said."""

    op: str
    n: int
    costs: Costs
    by_fn: FnCosts
    events: int = 0
    evictions: int = 0
    reads: int = 0


def run_steps(
    kind: str,
    engine: str,
    relay: str,
    steps: list[tuple[str, int]],
    *,
    sim: bool,
    keep: str | None = None,
    words: int | None = None,
) -> list[Step]:
    """Runs worker ``kind`` under cachegrind, a snapshot before and after each of ``steps``
    (worker ops: ``nonstream``, ``short``, ``stream``, ``cold``, ``evict``); the output files
    stay in ``keep`` if given (for ``cg_annotate``/``cg_diff``)."""
    from bench_client import Client

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as err:
        where = keep or tmp
        os.makedirs(where, exist_ok=True)
        wrap = valgrind(os.path.join(where, f"{kind}.%p"), sim)
        os.environ["BENCH_SLOW_CLOCK"] = str(SLOWDOWN)
        client = Client(kind, engine, relay, "v1", wrap=wrap, stderr=err, words=words)
        outs: list[dict[str, Any]] = []
        try:
            client.ready()
            snaps = [client.run("snapshot", 0)]
            for op, n in steps:
                outs.append(client.run(op, n))
                snaps.append(client.run("snapshot", 0))
        except Exception:
            err.seek(0)
            raise RuntimeError(f"{kind} under valgrind: {err.read()[-2000:]}") from None
        finally:
            client.close()
        profiles = [parse(os.path.join(where, f"{kind}.{s['pid']}")) for s in snaps]
    done = []
    for i, (op, n) in enumerate(steps):
        a, b = profiles[i], profiles[i + 1]
        done.append(
            Step(
                op,
                n,
                _lin([(1, b.totals), (-1, a.totals)]),
                _lin([(1, b.by_fn), (-1, a.by_fn)]),
                sum(outs[i].get("events", [])),
                snaps[i + 1]["evictions"] - snaps[i]["evictions"],
                snaps[i + 1]["reads"] - snaps[i]["reads"],
            )
        )
    return done


def _own(step: Step, per_eviction: Step | None) -> tuple[Costs, FnCosts]:
    """A step's costs without its evictions' (:data:`per_eviction` is one eviction's)."""
    if per_eviction is None or not step.evictions:
        return step.costs, step.by_fn
    k = -step.evictions
    return (
        _lin([(1, step.costs), (k, per_eviction.costs)]),
        _lin([(1, step.by_fn), (k, per_eviction.by_fn)]),
    )


@dataclass
class Unit:
    """Per non-stream call and per streamed event of one client in one variant."""

    call: Costs
    call_fn: FnCosts
    event: Costs
    event_fn: FnCosts
    reads: tuple[float, float]


def per_unit(steps: list[Step], per_eviction: Step | None) -> Unit:
    """From a variant's ``nonstream``, ``short`` and ``stream`` steps: per call, and per event
    as (long − short) / (their events' difference), which cancels a stream's fixed cost."""
    by = {s.op: s for s in steps}
    call, short, long = by["nonstream"], by["short"], by["stream"]
    c, cf = _own(call, per_eviction)
    s, sf = _own(short, per_eviction)
    g, gf = _own(long, per_eviction)
    de = long.events / long.n - short.events / short.n
    ws = [(1 / long.n / de, g), (-1 / short.n / de, s)]
    wf = [(1 / long.n / de, gf), (-1 / short.n / de, sf)]
    return Unit(
        _lin([(1 / call.n, c)]),
        _lin([(1 / call.n, cf)]),
        _lin(ws),
        _lin(wf),
        (call.reads / call.n, (long.reads / long.n - short.reads / short.n) / de),
    )


def over(a: dict[Any, Any], b: dict[Any, Any]) -> dict[Any, Any]:
    return _lin([(1, a), (-1, b)])


def fn_label(key: tuple[str, str]) -> str:
    fl, fn = key
    if fl == "???":
        return fn
    parts = Path(fl).parts
    return f"{'/'.join(parts[-2:])}:{fn}"


def top_functions(
    ours: FnCosts, floor: FnCosts, n: int = 30
) -> Iterator[tuple[str, dict[str, float], dict[str, float]]]:
    """The ``n`` functions where ours' (E2EE − plain) estimated cycles exceed the floor's the
    most: (label, ours' metrics, floor's metrics)."""
    keys = set(ours) | set(floor)
    rows = [(k, metrics(ours.get(k, {})), metrics(floor.get(k, {}))) for k in keys]
    rows.sort(key=lambda r: r[2]["est. cycles"] - r[1]["est. cycles"])
    for k, o, f in rows[:n]:
        yield fn_label(k), o, f


def by_file(fns: FnCosts) -> FnCosts:
    """Per-function costs summed per source file (``???``: no debug information)."""
    out: FnCosts = {}
    for (fl, _), c in fns.items():
        acc = out.setdefault((fl, "*"), {})
        for e, v in c.items():
            acc[e] = acc.get(e, 0.0) + v
    return out


KINDS = ("ours-plain", "floor-e2ee", "ours-e2ee", "ref-plain", "ref-e2ee")


def measure(
    n: int, streams: int, words: int, evictions: int, keep: str | None, parallel: int = 3
) -> dict[str, dict[str, Unit]]:
    """Every client's per-call and per-event units, ``warm`` and ``cold``, one valgrind run
    each (see the module's docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench_client import _CLI_CODE, stack

    _CLI_CODE[:] = [LONG_NONCES]
    variant = [("nonstream", n), ("short", streams), ("stream", streams)]
    script = [("paced", 0), *variant, ("cold", 0), *variant, ("evict", evictions)]
    units: dict[str, dict[str, Unit]] = {}

    def one_client(kind: str) -> None:
        steps = run_steps(kind, engine, relay, script, sim=True, keep=keep, words=words)
        ev = steps[-1]
        one = Step("evict", 1, _lin([(1 / ev.n, ev.costs)]), _lin([(1 / ev.n, ev.by_fn)]))
        units[kind] = {"warm": per_unit(steps[1:4], None), "cold": per_unit(steps[5:8], one)}
        u = units[kind]["cold"]
        print(
            f"  {kind}: cold {metrics(u.call)['est. cycles']:,.0f} est. cycles per call, "
            f"{metrics(u.event)['est. cycles']:,.0f} per event; reads per call "
            f"{u.reads[0]:.2f}, per event {u.reads[1]:.2f}",
            flush=True,
        )

    with stack() as (engine, relay), ThreadPoolExecutor(parallel) as pool:
        # (deterministic counts: the clients may share the cores; the engine's pace is slow
        # enough for each to read one event at a time, see the reads per event)
        for done in [pool.submit(one_client, kind) for kind in KINDS]:
            done.result()
    if keep:
        with open(os.path.join(keep, "units.json"), "w") as f:
            json.dump(
                {k: {v: _jsonable(vars(u)) for v, u in d.items()} for k, d in units.items()}, f
            )
    return units


def load(path: str | Path) -> dict[str, dict[str, Unit]]:
    """The units a ``--cg-keep`` run saved (``units.json``)."""
    with open(path) as f:
        saved = json.load(f)

    def fns(d: dict[str, Costs]) -> FnCosts:
        return {(k.split("\t", 1)[0], k.split("\t", 1)[1]): v for k, v in d.items()}

    return {
        kind: {
            v: Unit(u["call"], fns(u["call_fn"]), u["event"], fns(u["event_fn"]), tuple(u["reads"]))
            for v, u in variants.items()
        }
        for kind, variants in saved.items()
    }


def _jsonable(value: Any) -> Any:
    """``value`` with its (file, function) keys joined by a tab."""
    if isinstance(value, dict):
        return {"\t".join(k) if isinstance(k, tuple) else k: _jsonable(v) for k, v in value.items()}
    return value


def _fmt(v: float) -> str:
    return f"{v:+,.0f}" if abs(v) >= 10 else f"{v:+.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}×" if b > 0 else "∞"


def report(units: dict[str, dict[str, Unit]], top: int = 30) -> None:
    """The table (E2EE − plain per call and per event, warm and cold) and the cold work
    order: the functions and files where ours' costs exceed the floor's."""
    print(
        "\n| variant | unit | metric | floor | ours | reference | ref ÷ ours | ref ÷ floor "
        "| ours − floor |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    deltas: dict[tuple[str, str, str], FnCosts] = {}
    for variant in ("warm", "cold"):
        for unit in ("call", "event"):
            row: dict[str, dict[str, float]] = {}
            for sdk, e2ee, plain in (
                ("floor", "floor-e2ee", "ours-plain"),
                ("ours", "ours-e2ee", "ours-plain"),
                ("ref", "ref-e2ee", "ref-plain"),
            ):
                a, b = units[e2ee][variant], units[plain][variant]
                row[sdk] = metrics(over(getattr(a, unit), getattr(b, unit)))
                deltas[(variant, unit, sdk)] = over(
                    getattr(a, unit + "_fn"), getattr(b, unit + "_fn")
                )
            for m in METRICS:
                f, o, r = (row[s][m] for s in ("floor", "ours", "ref"))
                label = f"**{m}** (estimate)" if m == "est. cycles" else m
                print(
                    f"| {variant} | per {unit} | {label} | {_fmt(f)} | {_fmt(o)} | {_fmt(r)} "
                    f"| {_ratio(r, o)} | {_ratio(r, f)} | {_fmt(o - f)} |"
                )
    print(f"\nest. cycles = {CYCLES_MODEL} (a model, not a measurement)")
    print("\nSocket reads per call / per event, warm and cold (cold: an eviction before each):")
    for kind in KINDS:
        (a, b), (c, d) = units[kind]["warm"].reads, units[kind]["cold"].reads
        print(f"  {kind}: warm {a:.2f} / {b:.2f}, cold {c:.2f} / {d:.2f}")
    for unit in ("call", "event"):
        ours, floor = deltas[("cold", unit, "ours")], deltas[("cold", unit, "floor")]
        for title, o_fn, f_fn, n in (
            ("files", by_file(ours), by_file(floor), 15),
            ("functions", ours, floor, top),
        ):
            print(
                f"\nCold, per {unit}, E2EE − plain: the {n} {title} where ours exceeds the "
                "floor most (est. cycles; then ours' own misses)"
            )
            print(
                "\n| where | ours − floor | ours | floor | ours I1 | ours D1 | ours LL "
                "| ours mispred | ours instr |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for label, o, f in top_functions(o_fn, f_fn, n):
                c = "est. cycles"
                print(
                    f"| {label} | {_fmt(o[c] - f[c])} | {_fmt(o[c])} | {_fmt(f[c])} "
                    f"| {_fmt(o['I1 misses'])} | {_fmt(o['D1 misses'])} | {_fmt(o['LL misses'])} "
                    f"| {_fmt(o['mispredicts'])} | {_fmt(o['instructions'])} |"
                )


def cachegrind_table(n: int, words: int, keep: str | None) -> None:
    streams = max(1, n // 10)
    print(
        f"Cachegrind ({' '.join(CACHES)}, branch simulation), client process only, "
        f"PYTHONHASHSEED=0: {n} non-stream calls, {streams} short and {streams} long "
        f"({words}-word) streams per variant; per event = (long − short) / their events' "
        "difference; cold = evicted before every call and socket read, the evictions' own "
        "cost taken off"
    )
    units = measure(n, streams, words, max(20, n), keep)
    report(units)


if __name__ == "__main__":  # the report again from a kept run: _cachegrind.py DIR/units.json
    import sys

    report(load(sys.argv[1]))
