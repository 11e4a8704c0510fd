"""`python -m bench.inspector [--quick] [--views] [--dir DIR]`: the inspector's figures (not tests).

Side by side on a 10k-event and a 1M-event log (`bench.logbuild`; `--quick`: 10k and
100k): the p95 server time of every page and API call (in-process, through the ASGI app),
the time-travel slider at random positions of a session, the first read of the log, and
the live latency from an append by another writer to the event reaching the stream, on
SQLite and PostgreSQL; and the first call in a new process of the registry API and the
processes page (each in `FIRST_RUNS` new processes, beside the warm p95). `--views`: only
the views made cheap by ADR-0014, before and after.
Logs are kept in DIR (default /tmp/orchestrator-bench) for reuse.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.logbuild import build_log, middle_task
from events.catalogue import MemoryPut
from events.store import EventLog, Filter

RUNS = 30
SLOW_RUNS = 3  # the views' whole answers, which fold the whole log (`limit=` left empty)
SLOW = ("api whatif (whole, every session)", "api replay (whole log)")


def p95(samples: list[float]) -> float:
    """The nearest-rank 95th percentile, in ms."""
    ordered = sorted(samples)
    return 1000 * ordered[max(0, min(len(ordered) - 1, round(0.95 * len(ordered) + 0.5) - 1))]


def _log(directory: Path, size: int) -> str:
    path = directory / f"log-{size}.db"
    url = f"sqlite:///{path}"
    if not path.exists():
        started = time.perf_counter()
        build_log(url, size)
        print(f"built {size:,} events in {time.perf_counter() - started:.0f} s", flush=True)
    return url


def _filler_session(url: str) -> str:
    """A session from the middle of the log (about 750 events of its own)."""
    log = EventLog(url)
    try:
        head = log.head()
        for _, event in log.select(Filter(types=("WorkerModelSet",)), after=head // 2, limit=1):
            return event.session_id
        return "bench"
    finally:
        log.close()


def pages(url: str) -> dict[str, Any]:
    """p95 of every page and API call, the slider, and the first read, on one log."""
    from starlette.testclient import TestClient

    from orchestrator.ui.app import create_app
    from orchestrator.ui.data import Inspector

    session, task = _filler_session(url), middle_task(url)
    tracemalloc.start()
    started = time.perf_counter()
    data = Inspector(url)
    while data.catch_up():
        pass
    first_read = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data.head = data.log.head()
    config = 'model = "local/echo-small"\n'
    calls: dict[str, tuple[str, str, dict[str, str] | None]] = {
        "page /": ("GET", "/", None),
        "page session": ("GET", f"/sessions/{session}", None),
        "page session timeline": ("GET", f"/sessions/{session}/timeline", None),
        "page session at (slider)": ("GET", f"/sessions/{session}/at?index=100", None),
        "page session diff": ("GET", f"/sessions/{session}/diff?a=10&b=400", None),
        "page task": ("GET", f"/tasks/{task}", None),
        "page processes": ("GET", "/processes", None),
        "page events": ("GET", "/events", None),
        "page events (session)": ("GET", f"/events?session_id={session}", None),
        "page events (type, late)": (
            "GET",
            f"/events?type=WorkerModelSet&since={data.head // 2}",
            None,
        ),
        "page usage": ("GET", "/usage", None),
        "page whatif (session)": ("POST", "/whatif", {"config": config, "session": session}),
        "page whatif (every session, a page)": ("POST", "/whatif", {"config": config}),
        "page whatif (every session, late page)": (
            "POST",
            "/whatif",
            {"config": config, "since": str(data.head // 2)},
        ),
        "api tasks": ("GET", f"/api/views/tasks?session_id={session}", None),
        "api workers": ("GET", f"/api/views/workers?session_id={session}", None),
        "api models": ("GET", "/api/views/models", None),
        "api profiles": ("GET", "/api/views/profiles", None),
        "api memory": ("GET", "/api/views/memory", None),
        "api events (limit 100)": ("GET", "/api/views/events?limit=100", None),
        "api events (session)": ("GET", f"/api/views/events?session_id={session}", None),
        "api explain task": ("GET", f"/api/views/explain?task_id={task}", None),
        "api usage (session)": ("GET", f"/api/views/usage?session_id={session}", None),
        "api registry": ("GET", "/api/views/registry", None),
        "api replay (page of 500 tasks)": (
            "GET",
            f"/api/views/replay?until={data.head // 2}",
            None,
        ),
        "api replay (session)": ("GET", f"/api/views/replay?session_id={session}", None),
        "api diff": (
            "GET",
            f"/api/views/diff?since={data.head // 2}&until={data.head // 2 + 100}",
            None,
        ),
        "api whatif (page of 500)": ("GET", "/api/views/whatif?config=/dev/null", None),
        "api whatif (late page of 500)": (
            "GET",
            f"/api/views/whatif?config=/dev/null&since={data.head // 2}",
            None,
        ),
        "api whatif (session)": (
            "GET",
            f"/api/views/whatif?config=/dev/null&session_id={session}",
            None,
        ),
        # The whole answers (`limit=` empty), as large as the log: reported, not paged.
        "api replay (whole log)": ("GET", f"/api/views/replay?until={data.head // 2}&limit=", None),
        "api whatif (whole, every session)": (
            "GET",
            "/api/views/whatif?config=/dev/null&limit=",
            None,
        ),
    }
    results: dict[str, float] = {}
    sizes: dict[str, int] = {}  # bytes of each answer: a bigger answer is not a slower call
    with TestClient(create_app(data, "t"), headers={"Authorization": "Bearer t"}) as client:
        for name, (method, path, form) in calls.items():
            runs = SLOW_RUNS if name in SLOW else RUNS
            samples = []
            for i in range(runs + 2):
                t0 = time.perf_counter()
                reply = client.request(method, path, data=form)
                if i >= 2:
                    samples.append(time.perf_counter() - t0)
            assert reply.status_code == 200, (name, reply.text[:200])
            results[name] = p95(samples)
            sizes[name] = len(reply.content)
        past = data.history(session)
        picks = [random.randrange(len(past.stops)) for _ in range(200)]
        slider = []
        for index in picks:
            t0 = time.perf_counter()
            data.travel(session, index)
            slider.append(time.perf_counter() - t0)
    data.close()
    return {
        "calls": results,
        "bytes": sizes,
        "slider_p95_ms": p95(slider),
        "slider_max_ms": 1000 * max(slider),
        "session_stops": len(past.stops),
        "registry_checkpoints": data.registry.checkpoints,
        "first_read_s": first_read,
        "first_read_peak_mb": peak / 2**20,
    }


def views_before_after(url: str, runs: int = 10) -> dict[str, tuple[float, float]]:
    """p95 ms of the views made cheap (ADR-0014), before (the full folds they replaced, run
    once each: they take seconds on a big log) and after (through the API, warmed)."""
    from starlette.testclient import TestClient

    from events.reads import registry_history
    from events.replay import replay
    from orchestrator import history
    from orchestrator.config import load_config
    from orchestrator.explain import replay_view
    from orchestrator.ui.app import create_app
    from orchestrator.ui.data import Inspector

    session = _filler_session(url)
    data = Inspector(url)
    data.head = head = data.log.head()
    since, until = head // 2, head // 2 + 100
    completed = Filter(session_id=session, types=("TaskCompleted",))
    before: dict[str, Any] = {
        "api events (session)": lambda: list(data.log.select(Filter(session_id=session))),
        "api usage (session)": lambda: list(data.log.select(completed)),
        "api registry": lambda: registry_history(data.log),
        "api diff": lambda: history.diff(data.log, since, until),
        "api replay (page of 500 tasks)": lambda: replay_view(replay(data.log, until=since)),
        "api whatif (page of 500)": lambda: history.whatif(data.log, load_config(None), {}),
    }
    after = {
        "api events (session)": f"/api/views/events?session_id={session}",
        "api usage (session)": f"/api/views/usage?session_id={session}",
        "api registry": "/api/views/registry",
        "api diff": f"/api/views/diff?since={since}&until={until}",
        "api replay (page of 500 tasks)": f"/api/views/replay?until={since}",
        "api whatif (page of 500)": "/api/views/whatif?config=/dev/null",
    }
    out: dict[str, tuple[float, float]] = {}
    with TestClient(create_app(data, "t"), headers={"Authorization": "Bearer t"}) as client:
        for name, path in after.items():
            t0 = time.perf_counter()
            before[name]()
            slow = 1000 * (time.perf_counter() - t0)
            samples = []
            for i in range(runs + 2):  # the first builds the registry's checkpoints
                t0 = time.perf_counter()
                reply = client.get(path)
                if i >= 2:
                    samples.append(time.perf_counter() - t0)
            assert reply.status_code == 200, (name, reply.text[:200])
            out[name] = (slow, p95(samples))
    data.close()
    return out


FIRST_RUNS = 5  # new processes per first call measured
FIRST_CALLS = {"api registry": "/api/views/registry", "page processes": "/processes"}


def first_call(url: str, path: str) -> dict[str, float]:
    """In this process: open the inspector on `url` (no follower, nothing read yet) and
    time its first and second GET of `path` (ms), and the opening (s)."""
    from starlette.testclient import TestClient

    from orchestrator.ui.app import create_app
    from orchestrator.ui.data import Inspector

    t0 = time.perf_counter()
    data = Inspector(url)
    opened = time.perf_counter() - t0
    times = []
    with TestClient(create_app(data, "t"), headers={"Authorization": "Bearer t"}) as client:
        for _ in range(2):
            t0 = time.perf_counter()
            reply = client.get(path)
            times.append(1000 * (time.perf_counter() - t0))
            assert reply.status_code == 200, (path, reply.text[:200])
    data.close()
    return {"open_s": opened, "first_ms": times[0], "second_ms": times[1]}


def first_calls(url: str) -> dict[str, dict[str, float]]:
    """The first call in a new process, `FIRST_RUNS` new processes per call: the median
    and the slowest first call (ms), the median second one, the median opening (s)."""
    import subprocess

    out = {}
    for name, path in FIRST_CALLS.items():
        runs = []
        for _ in range(FIRST_RUNS):
            done = subprocess.run(
                [sys.executable, "-m", "bench.inspector", "--first-call", url, path],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        firsts = [r["first_ms"] for r in runs]
        out[name] = {
            "first_median_ms": statistics.median(firsts),
            "first_max_ms": max(firsts),
            "second_median_ms": statistics.median(r["second_ms"] for r in runs),
            "open_median_s": statistics.median(r["open_s"] for r in runs),
        }
    return out


def live_latency(url: str, samples: int = 20) -> dict[str, float]:
    """From an append by another writer (its own connection) to the stream having it."""
    from orchestrator.ui.data import Inspector

    data = Inspector(url)
    data.start()
    writer = EventLog(url)
    version = writer.stream_version("memory")
    seen: list[float] = []
    try:
        for i in range(samples):
            head = data.head
            got: list[float] = []

            def watch(after: int = head, out: list[float] = got) -> None:
                new = data.wait_for_head(after, 5.0)
                data.records(Filter(), after, new)
                out.append(time.perf_counter())

            watcher = threading.Thread(target=watch)
            watcher.start()
            time.sleep(0.05 + random.random() * 0.3)  # land anywhere in the poll interval
            t0 = time.perf_counter()
            writer.append(
                "memory", [MemoryPut(session_id="bench-live", key=f"k{i}", value="v")], version
            )
            version += 1
            watcher.join(10)
            seen.append(got[0] - t0 if got else 5.0)
    finally:
        writer.close()
        data.close()
    return {"median_ms": 1000 * statistics.median(seen), "p95_ms": p95(seen)}


def _postgres_url() -> tuple[str, Any] | None:
    import os
    import uuid

    try:
        import psycopg
    except ImportError:
        return None
    base = os.environ.get(
        "ORCHESTRATOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    try:
        psycopg.connect(base, connect_timeout=3).close()
    except psycopg.Error:
        return None
    schema = f"bench_{uuid.uuid4().hex[:8]}"

    def drop() -> None:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return f"{base}?schema={schema}", drop


def main() -> None:
    """Measure and print; results also go to bench/inspector-results.json."""
    if "--first-call" in sys.argv:  # a child of `first_calls`
        at = sys.argv.index("--first-call")
        print(json.dumps(first_call(sys.argv[at + 1], sys.argv[at + 2])))
        return
    quick = "--quick" in sys.argv
    directory = Path(
        sys.argv[sys.argv.index("--dir") + 1] if "--dir" in sys.argv else "/tmp/orchestrator-bench"
    )
    directory.mkdir(parents=True, exist_ok=True)
    sizes = (10_000, 100_000) if quick else (10_000, 1_000_000)
    if "--views" in sys.argv:  # only the views made cheap, before and after
        found = {size: views_before_after(_log(directory, size)) for size in sizes}
        print(f"{'p95 ms (before: the full fold, once)':36}", *(f"{s:>18,}" for s in sizes))
        for name in found[sizes[0]]:
            cells = [f"{found[s][name][0]:8.1f}->{found[s][name][1]:7.1f}" for s in sizes]
            print(f"{name:36}", *(f"{c:>18}" for c in cells))
        return
    measured = {size: pages(_log(directory, size)) for size in sizes}
    small, big = sizes
    firsts = {size: first_calls(_log(directory, size)) for size in sizes}
    print(f"\n{'first call in a new process (ms)':44} {small:>10,} {big:>10,}")
    for name in FIRST_CALLS:
        for key in ("first_median_ms", "first_max_ms", "second_median_ms", "open_median_s"):
            a, b = firsts[small][name][key], firsts[big][name][key]
            print(f"{name + ' ' + key:44} {a:10.1f} {b:10.1f}")
        measured[small][f"first {name}"] = firsts[small][name]
        measured[big][f"first {name}"] = firsts[big][name]
    print(
        f"\n{'call (p95 ms, server time in-process)':44} {small:>10,} {big:>10,}  ratio"
        "   answer KB (small / big)"
    )
    for name in measured[small]["calls"]:
        a, b = measured[small]["calls"][name], measured[big]["calls"][name]
        kb = [measured[size]["bytes"][name] / 1024 for size in sizes]
        print(f"{name:44} {a:10.1f} {b:10.1f} {b / a:6.1f}x {kb[0]:9.1f} / {kb[1]:.1f}")
    for key in ("slider_p95_ms", "slider_max_ms", "session_stops", "registry_checkpoints"):
        print(f"{key:44} {measured[small][key]:10.1f} {measured[big][key]:10.1f}")
    for key in ("first_read_s", "first_read_peak_mb"):
        print(f"{key:44} {measured[small][key]:10.1f} {measured[big][key]:10.1f}")
    live_url = f"sqlite:///{directory / 'live.db'}"
    EventLog(live_url).close()  # an empty store to follow
    live = {"sqlite": live_latency(live_url)}
    pg = _postgres_url()
    if pg is not None:
        EventLog(pg[0]).close()  # an empty store to follow
        try:
            live["postgresql"] = live_latency(pg[0])
        finally:
            pg[1]()
    for store, figures in live.items():
        print(
            f"live latency {store:31} median {figures['median_ms']:.0f} ms, "
            f"p95 {figures['p95_ms']:.0f} ms"
        )
    out = Path(__file__).parent / "inspector-results.json"
    out.write_text(json.dumps({"sizes": measured, "live": live}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
