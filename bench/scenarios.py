"""The eight benchmark scenarios of `make bench`. Each returns rows measured beside their
floors, in the same run.

It stays one module over 400 lines because the README's Performance table is read from it
top to bottom: each scenario sits beside the floor it is compared with, and splitting them
would separate a figure from its floor.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench.measure import Row, Stats, timed
from events.store import EventLog
from orchestrator import Orchestrator
from orchestrator.backends.client import WorkerClient
from orchestrator.config import default_config
from orchestrator.providers import DEFAULT_MAX_REPLY, complete, reply_limit

ROOT = Path(__file__).resolve().parent.parent


def _config(backend: str) -> Any:
    cfg = default_config()
    for profile in cfg.profiles.values():
        profile.backend = backend  # type: ignore[assignment]
    return cfg


def _op(orch: Orchestrator, name: str, **worker: Any) -> dict[str, Any]:
    handle = orch.task_start(kind="op", op=name, worker={"worker_id": "coder", **worker})
    rec = orch.task_await(handle.task_id)
    assert rec.status == "completed", rec.error
    return rec.result or {}


class _Counter(Aggregate):
    @event("Incremented")
    def increment(self) -> None:
        pass


def _bare_saver(store_env: dict[str, str]) -> Callable[[], None]:
    """One eventsourcing application save of one event per call, on the given store."""
    app: Application[Any] = Application(env=store_env)
    agg = _Counter()
    app.save(agg)

    def save_one() -> None:
        agg.increment()
        app.save(agg)

    return save_one


def _bare_save_floor(store_env: dict[str, str], runs: int) -> Stats:
    """One eventsourcing application save of one event, on the same kind of store."""
    return timed(_bare_saver(store_env), runs)


def op_round_trip(tmp: Path, runs: int) -> list[Row]:
    """Scenario 1: worker.model.set + await, then reset + await."""
    rows = []
    for kind in ("memory", "sqlite"):
        url = "memory" if kind == "memory" else f"sqlite:///{tmp / 'ops.db'}"
        env = (
            {"PERSISTENCE_MODULE": "eventsourcing.popo"}
            if kind == "memory"
            else {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(tmp / "floor.db"),
            }
        )
        floor = _bare_save_floor(env, runs)
        with Orchestrator.open(config=_config("agent"), store=url, session_id="bench") as orch:
            set_ = timed(lambda o=orch: _op(o, "worker.model.set", model="local/echo-small"), runs)
            reset = timed(lambda o=orch: _op(o, "worker.model.reset"), runs)
        rows += [
            Row(
                "1 op round trip",
                f"set, {kind}",
                set_,
                "bare eventsourcing save",
                floor,
                target="<= 3x, flat" if kind == "memory" else "<= 1.5x",
            ),
            Row(
                "1 op round trip",
                f"reset, {kind}",
                reset,
                "bare eventsourcing save",
                floor,
                target="<= 3x, flat" if kind == "memory" else "<= 1.5x",
            ),
        ]
    return rows


def worker_task_overhead(tmp: Path, runs: int) -> list[Row]:
    """Scenario 2: a worker task on echo, agent and server, against the direct call; on the
    server, interleaved with one raw `/prompt` to the same process and with that raw call
    plus two bare durable saves (a task must commit its start before the work and its end
    after it: the least any durable task can cost on this disk)."""
    cfg = default_config()
    direct = timed(lambda: complete(cfg.providers, "local/echo-large", "hi"), runs)
    rows = []
    for backend in ("agent", "server"):
        url = f"sqlite:///{tmp / f'task-{backend}.db'}"
        with Orchestrator.open(config=_config(backend), store=url, session_id="bench") as orch:

            def task(o: Orchestrator = orch) -> None:
                rec = o.task_await(
                    o.task_start(kind="worker", worker_id="coder", task="hi").task_id
                )
                assert rec.status == "completed", rec.error

            if backend == "agent":
                stats = timed(task, runs)
                rows.append(
                    Row(
                        "2 worker task",
                        "agent backend, sqlite",
                        stats,
                        "provider called directly",
                        direct,
                    )
                )
                continue
            task()
            entry = orch.pool.live_entries("coder")[0]
            client = WorkerClient(str(entry.url), entry.instance_id)
            body = {"text": "hi", "model": "local/echo-large"}
            # What the server backend allows a reply: the same bound on both sides.
            max_bytes = 2 * reply_limit(DEFAULT_MAX_REPLY)
            save_one = _bare_saver(
                {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp / "two.db")}
            )
            tasks, raws, floors = [], [], []
            for _ in range(runs + 3):
                began = time.perf_counter()
                task()
                tasks.append(time.perf_counter() - began)
                began = time.perf_counter()
                client.prompt(body, timeout=10, max_bytes=max_bytes)
                raws.append(time.perf_counter() - began)
                began = time.perf_counter()
                save_one()
                save_one()
                floors.append(raws[-1] + time.perf_counter() - began)
            stats = Stats.of(tasks[3:])
            rows += [
                Row(
                    "2 worker task",
                    "server backend, sqlite",
                    stats,
                    "provider called directly",
                    direct,
                ),
                Row(
                    "2 worker task",
                    "server backend, sqlite",
                    stats,
                    "one raw /prompt to the same process (same keep-alive client)",
                    Stats.of(raws[3:]),
                    target="<= 1.5x",
                ),
                Row(
                    "2 worker task",
                    "server backend, sqlite",
                    stats,
                    "that raw /prompt + two bare durable eventsourcing saves",
                    Stats.of(floors[3:]),
                ),
            ]
            _op(orch, "worker.stop")
    return rows


REUSE_CHILD = """
import json, sys, time
from events.store import EventLog
from orchestrator import Orchestrator
from bench.scenarios import _config
url = sys.argv[1]
t0 = time.perf_counter()
log = EventLog(url)
t1 = time.perf_counter()
orch = Orchestrator.open(config=_config("server"), store=log, session_id="fresh")
handle = orch.task_start(kind="op", op="worker.spawn", worker={"worker_id": "coder"})
rec = orch.task_await(handle.task_id)
t2 = time.perf_counter()
assert rec.result["reused"], rec
print(json.dumps({"open": t1 - t0, "reuse": t2 - t0}))
"""


def _child(script: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def reuse_from_fresh_process(tmp: Path, runs: int) -> list[Row]:
    """Scenario 3: a new process opens the store and gets a reusable worker."""
    url = f"sqlite:///{tmp / 'reuse.db'}"
    with Orchestrator.open(config=_config("server"), store=url, session_id="owner") as orch:
        _op(orch, "worker.spawn")
        for _ in range(2):
            _child(REUSE_CHILD, url)  # warm-up
        samples = [_child(REUSE_CHILD, url) for _ in range(runs)]
        _op(orch, "worker.stop")
    reuse = Stats.of([s["reuse"] for s in samples])
    floor = Stats.of([s["open"] for s in samples])
    return [
        Row(
            "3 reuse from a fresh process",
            "sqlite, after imports",
            reuse,
            "same process only opening the store",
            floor,
            target="<= 50 ms",
        )
    ]


BARE_SERVER = (
    "import http.server, sys\n"
    "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n"
    "sys.stdout.write('READY %d\\n' % s.server_address[1]); sys.stdout.flush()\n"
    "s.serve_forever()\n"
)


def _bare_server_ready() -> None:
    """The floor of a spawn: a bare `http.server` started and announcing READY."""
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert line.startswith(b"READY"), line


def _opencode_binary(tmp: Path) -> Path | str:
    """The `opencode` binary of the `opencode-ai` npm package, installed offline into `tmp`
    (npm may skip the postinstall that links it, so take the platform package's binary), or
    the one-line reason it cannot run here."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    where = tmp / "opencode-peer"
    where.mkdir(exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(where), "opencode-ai"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        return f"npm install opencode-ai failed: {done.stderr.strip().splitlines()[-1:]}"
    machine = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    binary = where / "node_modules" / f"opencode-linux-{machine}" / "bin" / "opencode"
    return binary if binary.exists() else f"no opencode binary for linux-{machine}"


def _opencode_listening(binary: Path, home: Path) -> None:
    """Start `opencode serve` on a free loopback port and wait for its "listening" line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "XDG_DATA_HOME": str(home)}
    proc = subprocess.Popen(
        [str(binary), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or b"listening" in line:
                break
        assert b"listening" in line, line
    finally:
        proc.kill()
        proc.wait()


def cold_spawn(tmp: Path, runs: int) -> list[Row]:
    """Scenario 4: worker.spawn with force_new until the worker printed READY, interleaved
    with its floor (a bare http.server reaching READY) and, where npm can install it, the
    upstream peer `opencode serve` reaching "listening", so all see the same machine."""
    url = f"sqlite:///{tmp / 'spawn.db'}"
    spawns: list[float] = []
    floors: list[float] = []
    peers: list[float] = []
    peer = _opencode_binary(tmp)
    home = tmp / "opencode-home"
    home.mkdir(exist_ok=True)
    with Orchestrator.open(config=_config("server"), store=url, session_id="bench") as orch:
        _op(orch, "worker.spawn", force_new=True)  # warm-up
        if isinstance(peer, Path):
            _opencode_listening(peer, home)  # warm-up: its first start writes its state
        for _ in range(runs):
            began = time.perf_counter()
            _bare_server_ready()
            floors.append(time.perf_counter() - began)
            began = time.perf_counter()
            _op(orch, "worker.spawn", force_new=True)
            spawns.append(time.perf_counter() - began)
            # Untimed: every spawn starts from no live process, so none pays for an eviction
            # at max_processes (that is a stop, not a spawn).
            _op(orch, "worker.stop")
            if isinstance(peer, Path):
                began = time.perf_counter()
                _opencode_listening(peer, home)
                peers.append(time.perf_counter() - began)
        _op(orch, "worker.stop")
    rows = [
        Row(
            "4 cold spawn to READY",
            "worker.spawn force_new",
            Stats.of(spawns),
            "a bare http.server reaching READY",
            Stats.of(floors),
            target="<= 1.3x",
        )
    ]
    if peers:
        rows.append(
            Row(
                "4 cold spawn to READY",
                "upstream peer: `opencode serve` to listening (opencode-ai on npm)",
                Stats.of(peers),
                "our worker.spawn force_new, same loop",
                Stats.of(spawns),
            )
        )
    else:
        print(f"  skipped the opencode peer: {peer}", file=sys.stderr)
    return rows


# Replay and its floors are interleaved, best of REPLAY_ROUNDS each: one machine, one run.
LOG_CHILD = """
import json, resource, sys
from bench.logbuild import build_log, decode_floor, replay_all, typed_decode_floor
url, path, size, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
append = build_log(url, size)
floors, typeds, replays = [], [], []
for _ in range(rounds):
    floors.append(decode_floor(path))
    typeds.append(typed_decode_floor(path))
    replays.append(replay_all(url))
floor, typed = min(floors), min(typeds)
replay_seconds, events = min(replays)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"append_eps": append, "replay_eps": events / replay_seconds,
                  "floor_eps": events / floor, "typed_floor_eps": events / typed,
                  "replay_seconds": replay_seconds,
                  "events": events, "peak_rss": rss}))
"""

# Reads run in a fresh process, so peak memory is theirs alone.
READS_CHILD = """
import json, resource, sys
from bench.logbuild import debug_reads, open_and_read
url = sys.argv[1]
load = open_and_read(url, runs=20)
reads = debug_reads(url, runs=20)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load": load, "reads": reads, "peak_rss": rss}))
"""

REPLAY_ROUNDS = 3

READ_NAMES = {
    "explain": "explain task (another session's, mid-log)",
    "peek": "task_peek of another session's task",
    "session_page": "events page, one session (limit 100)",
    "worker_page": "events page, one worker (limit 100)",
}


def log_scaling(tmp: Path, sizes: list[int]) -> list[Row]:
    """Scenario 5: append and replay throughput against the decode floor, state load and
    the debugging reads by log size, each beside the same at the smallest size."""
    rows = []
    base: dict[str, Stats] = {}
    for size in sizes:
        path = tmp / f"log-{size}.db"
        url = f"sqlite:///{path}"
        r = _child(LOG_CHILD, url, str(path), str(size), str(REPLAY_ROUNDS))
        reads = _child(READS_CHILD, url)
        rss_mb = reads["peak_rss"] / 2**20
        rows += [
            Row("5 log", f"append, {size:,} events", unit="events/s", figure=r["append_eps"]),
            Row(
                "5 log",
                f"replay, {size:,} events",
                unit="events/s",
                figure=r["replay_eps"],
                target=">= 0.5x the typed floor (ratio_to_typed_floor)",
                extra={
                    "seconds": r["replay_seconds"],
                    "best_of": REPLAY_ROUNDS,
                    "floor": "read the same rows with sqlite3 and decode them with orjson",
                    "floor_eps": r["floor_eps"],
                    "ratio_to_floor": r["replay_eps"] / r["floor_eps"],
                    "typed_floor": "read the same rows and decode each into its event class",
                    "typed_floor_eps": r["typed_floor_eps"],
                    "ratio_to_typed_floor": r["replay_eps"] / r["typed_floor_eps"],
                    "peak_rss_mb": r["peak_rss"] / 2**20,
                },
            ),
        ]
        measured = {"load": Stats(**reads["load"])}
        measured |= {name: Stats(**s) for name, s in reads["reads"].items()}
        for name, stats in measured.items():
            base.setdefault(name, stats)
            label = "open + read state" if name == "load" else READ_NAMES[name]
            rows.append(
                Row(
                    "5 log",
                    f"{label}, {size:,} events",
                    stats,
                    f"same at {sizes[0]:,} events",
                    base[name],
                    target="<= 1.5x" if name == "load" else "<= 2x and < 50 ms",
                    extra={"peak_rss_mb": rss_mb},
                )
            )
    return rows


BIG_CHILD = """
import json, sys
from bench.logbuild import big_session, op_latency, open_session
url, tasks = sys.argv[1], int(sys.argv[2])
empty = open_session(url, "empty", runs=20)
small_op = op_latency(url, "empty", runs=200)
big_session(url, tasks)
big = open_session(url, "big", runs=20)
big_op = op_latency(url, "big", runs=200)
print(json.dumps({"empty": empty, "big": big, "small_op": small_op, "big_op": big_op}))
"""


def session_size(tmp: Path, tasks: int) -> list[Row]:
    """Scenario 7: a session with many finished tasks opens and decides like a new one."""
    r = _child(BIG_CHILD, f"sqlite:///{tmp / 'big.db'}", str(tasks))
    return [
        Row(
            "7 session size",
            f"open a session with {tasks:,} finished tasks",
            Stats(**r["big"]),
            "open an empty session",
            Stats(**r["empty"]),
            target="<= 1.5x",
        ),
        Row(
            "7 session size",
            f"worker.model.set + await after {tasks:,} tasks (see p99)",
            Stats(**r["big_op"]),
            "same on a new session",
            Stats(**r["small_op"]),
            target="flat",
        ),
    ]


CONTENDER = """
import json, sys, time
from orchestrator import Orchestrator
from bench.scenarios import _config
url, go_at = sys.argv[1], float(sys.argv[2])
orch = Orchestrator.open(config=_config("server"), store=url)
time.sleep(max(0.0, go_at - time.time()))
handle = orch.task_start(kind="op", op="worker.spawn", worker={"worker_id": "coder"})
rec = orch.task_await(handle.task_id)
print(json.dumps({"held_at": time.time(), "reused": rec.result["reused"]}))
orch.close()
"""


def contention(tmp: Path, runs: int) -> list[Row]:
    """Scenario 6: N processes ask for the same worker at once."""
    rows = []
    for n in (2, 4, 8):
        spawns, waits = [], []
        for i in range(runs):
            url = f"sqlite:///{tmp / f'contend-{n}-{i}.db'}"
            go_at = time.time() + 2.5
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", CONTENDER, url, str(go_at)],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
                for _ in range(n)
            ]
            results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            waits.append(max(r["held_at"] for r in results) - go_at)
            with Orchestrator.open(config=_config("server"), store=url) as observer:
                spawns.append(len(observer.task_list(view="events", type="WorkerSpawned")))
                _op(observer, "worker.stop")
        rows.append(
            Row(
                "6 contention",
                f"{n} processes",
                Stats.of(waits),
                target="1 spawn",
                extra={"spawns_per_run": spawns},
            )
        )
    return rows


def _wall(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
    return time.perf_counter() - began


def import_costs(env: dict[str, str]) -> dict[str, float]:
    """Milliseconds of import time per top-level package when `orchestrator workers` runs
    (the sum of each module's own time, from `python -X importtime`)."""
    script = (
        "import sys; sys.argv = ['orchestrator', 'workers']\n"
        "from orchestrator.cli import main\n"
        "main()"
    )
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    costs: dict[str, float] = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line[len("import time:") :].split("|")
        top = name.strip().split(".")[0]
        costs[top] = costs.get(top, 0.0) + int(own) / 1000
    return dict(sorted(costs.items(), key=lambda kv: -kv[1]))


def cli_startup(tmp: Path, runs: int) -> list[Row]:
    """Scenario 8: `orchestrator --help` and `orchestrator workers` on a warm SQLite store,
    interleaved with `python -c pass`, and where the import time of a command goes."""
    exe = str(Path(sys.executable).with_name("orchestrator"))
    env = {**os.environ, "ORCHESTRATOR_STORE": f"sqlite:///{tmp / 'cli.db'}"}
    EventLog(env["ORCHESTRATOR_STORE"]).close()  # `workers` reads a store, never makes one
    subprocess.run([exe, "workers"], env=env, capture_output=True, check=True, timeout=60)
    floor, help_, workers, typer_, typed, stack = [], [], [], [], [], []
    for _ in range(runs):
        floor.append(_wall([sys.executable, "-c", "pass"], env))
        help_.append(_wall([exe, "--help"], env))
        workers.append(_wall([exe, "workers"], env))
        # What the chosen stack costs before any of our code runs: the CLI framework, and
        # the typed event classes any command that reads the log must build.
        typer_.append(_wall([sys.executable, "-c", "import typer"], env))
        typed.append(_wall([sys.executable, "-c", "import events"], env))
        # Both: what any log-reading command costs before it does anything.
        stack.append(_wall([sys.executable, "-c", "import events, typer"], env))
    costs = import_costs(env)
    top = {name: round(ms, 1) for name, ms in list(costs.items())[:12]}
    return [
        Row(
            "8 CLI start-up",
            "orchestrator --help",
            Stats.of(help_),
            "python -c pass",
            Stats.of(floor),
            target="<= 100 ms",
        ),
        Row(
            "8 CLI start-up",
            "orchestrator workers, warm SQLite store",
            Stats.of(workers),
            "python -c pass",
            Stats.of(floor),
            target="<= 150 ms",
            extra={"import_ms_by_package": top, "import_ms_total": round(sum(costs.values()), 1)},
        ),
        Row(
            "8 CLI start-up",
            "orchestrator --help",
            Stats.of(help_),
            "python -c 'import typer' (the CLI framework alone)",
            Stats.of(typer_),
        ),
        Row(
            "8 CLI start-up",
            "orchestrator workers, warm SQLite store",
            Stats.of(workers),
            "python -c 'import events' (the typed event classes alone)",
            Stats.of(typed),
        ),
        Row(
            "8 CLI start-up",
            "orchestrator workers, warm SQLite store",
            Stats.of(workers),
            "python -c 'import events, typer' (the stack every log-reading command loads)",
            Stats.of(stack),
            target="no absolute target: reported beside this floor",
        ),
    ]


def all_scenarios(quick: bool) -> list[Row]:
    """Every scenario, in order; `quick` uses fewer runs and smaller logs."""
    runs = 30 if quick else 200
    proc_runs = 5 if quick else 15
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="bench-state-"))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as name:
        tmp = Path(name)
        for step in (
            lambda: op_round_trip(tmp, runs),
            lambda: worker_task_overhead(tmp, runs),
            lambda: reuse_from_fresh_process(tmp, proc_runs),
            lambda: cold_spawn(tmp, proc_runs),
            lambda: log_scaling(tmp, sizes),
            lambda: session_size(tmp, 10_000),
            lambda: contention(tmp, 3),
            lambda: cli_startup(tmp, proc_runs),
        ):
            new = step()
            rows += new
            for row in new:
                print(f"  done: {row.scenario} / {row.variant}", file=sys.stderr, flush=True)
    return rows
