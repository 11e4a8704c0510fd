"""Managed model servers, measured (figures, not timed tests): `python -m bench.model_servers
[--quick]`.

1. A task on a model whose server already runs, beside the same task sent to an unmanaged
   provider whose `base_url` is that same server (target: within 1.2x).
2. Start-to-ready: the orchestrator starting a server until its ready path answers, beside
   the same command started by hand and polled the same way, interleaved (target: the
   difference within 50 ms).
3. A mixed workload of 3 models with `max_model_servers = 2`, round robin and skewed: the
   number of server starts beside Belady's optimum for that sequence, and the time spent
   waiting for starts.

The server is `tests/model_server.py`, a stand-in for llama-server that "loads" for a
configurable time.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import Row, Stats
from orchestrator import Orchestrator
from orchestrator.model_servers import free_port, ready_probe

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "tests" / "model_server.py")
MODELS = ("m1", "m2", "m3")


def _config(root: Path, startup: float, max_servers: int, raw_port: int | None = None) -> Path:
    command = json.dumps(
        [sys.executable, SERVER, "--model", "{path}", "--port", "{port}", "--startup", "{startup}"]
    )
    lines = [
        'model = "lab/m1"',
        "[pool]",
        f"max_model_servers = {max_servers}",
        "[providers.lab]",
        'kind = "openai"',
        "[providers.lab.server]",
        f"command = {command}",
        "start_timeout = 60",
    ]
    for name in MODELS:
        lines += [
            f'[providers.lab.models."{name}"]',
            f'path = "/models/{name}.gguf"',
            f'startup = "{startup}"',
        ]
    if raw_port is not None:  # the same server, unmanaged
        lines += [
            "[providers.raw]",
            'kind = "openai"',
            f'base_url = "http://127.0.0.1:{raw_port}/v1"',
            '[providers.raw.models."m1"]',
        ]
    lines += ["[profiles.coder]", 'model = "lab/m1"', 'backend = "server"']
    path = root / f"o-{startup}-{max_servers}-{raw_port}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(orch: Orchestrator, model: str, text: str = "hi") -> Any:
    handle = orch.task_start(kind="worker", worker_id="coder", task=text, model=model)
    rec = orch.task_await(handle.task_id, timeout=120)
    assert rec.status == "completed", rec.error
    return rec


def running_task(root: Path, runs: int) -> list[Row]:
    """A task on a running managed model vs the same server as an unmanaged provider."""
    store = f"sqlite:///{root / 'running.db'}"
    with Orchestrator.open(config=_config(root, 0.0, 2), store=store) as first:
        _run(first, "lab/m1")
        (server,) = [
            r
            for r in first.task_list(view="registry")
            if r.kind == "model_server" and r.status == "ready"
        ]
        cfg = _config(root, 0.0, 2, raw_port=server.port)
        with Orchestrator.open(config=cfg, store=store) as orch:
            rows = []
            for backend in ("server", "agent"):
                orch.config.profiles["coder"].backend = backend  # type: ignore[assignment]
                managed: list[float] = []
                unmanaged: list[float] = []
                for model in ("lab/m1", "raw/m1") * 3:  # warm both paths
                    _run(orch, model)
                for _ in range(runs):  # interleaved
                    for model, samples in (("lab/m1", managed), ("raw/m1", unmanaged)):
                        start = time.perf_counter()
                        _run(orch, model)
                        samples.append(time.perf_counter() - start)
                rows.append(
                    Row(
                        "model server: task on a running server",
                        f"{backend} backend",
                        Stats.of(managed),
                        "unmanaged provider, same server",
                        Stats.of(unmanaged),
                        target="<= 1.2x",
                    )
                )
            orch.close(stop_workers=True)
        first.close(stop_workers=True)
    return rows


def start_to_ready(root: Path, runs: int) -> Row:
    """The orchestrator's start of a server until ready vs the command by hand, polled."""
    store = f"sqlite:///{root / 'start.db'}"
    managed: list[float] = []
    by_hand: list[float] = []
    with Orchestrator.open(config=_config(root, 0.0, 2), store=store) as orch:
        ids = {"session_id": orch.session_id}
        for i in range(runs + 1):
            start = time.perf_counter()
            lease = orch.servers.acquire("lab/m1", ids)
            took = time.perf_counter() - start
            assert lease is not None and lease.started
            lease.release()
            orch.servers.stop(lease.entry, ids)
            port = free_port()
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, SERVER, "--model", "/models/m1.gguf", "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            pause = 0.005  # the orchestrator's own polling schedule
            while ready_probe(port, "/v1/models", 1.0) is not None:
                time.sleep(pause)
                pause = min(0.1, pause * 1.25)
            hand = time.perf_counter() - start
            proc.kill()
            proc.wait()
            if i:  # the first pair warms caches
                managed.append(took)
                by_hand.append(hand)
        orch.close(stop_workers=True)
    value, floor = Stats.of(managed), Stats.of(by_hand)
    return Row(
        "model server: start to ready",
        "orchestrator start",
        value,
        "same command by hand, polled",
        floor,
        target="+<= 50 ms",
        extra={"overhead_ms": round((value.median - floor.median) * 1000, 1)},
    )


def belady(sequence: list[str], slots: int) -> int:
    """The fewest starts any eviction policy could make for `sequence` with `slots`."""
    held: set[str] = set()
    starts = 0
    for i, model in enumerate(sequence):
        if model in held:
            continue
        starts += 1
        if len(held) >= slots:
            rest = sequence[i + 1 :]
            victim = max(held, key=lambda m: rest.index(m) if m in rest else len(rest) + 1)
            held.discard(victim)
        held.add(model)
    return starts


def mixed(root: Path, length: int, startup: float) -> list[Row]:
    """Round robin and skewed sequences over 3 models, 2 server slots."""
    rng = random.Random(7)
    sequences = {
        "round robin": [MODELS[i % 3] for i in range(length)],
        "skewed 70/20/10": rng.choices(MODELS, weights=(70, 20, 10), k=length),
    }
    rows = []
    for name, sequence in sequences.items():
        store = f"sqlite:///{root / f'mixed-{len(rows)}.db'}"
        with Orchestrator.open(config=_config(root, startup, 2), store=store) as orch:
            orch.config.profiles["coder"].backend = "agent"  # type: ignore[assignment]
            start = time.perf_counter()
            for model in sequence:
                _run(orch, f"lab/{model}")
            total = time.perf_counter() - start
            ready = orch.task_list(view="events", type="ModelServerReady")
            waited = sum(float(e.data["ready_seconds"]) for e in ready)
            rows.append(
                Row(
                    "model server: 3 models, 2 slots",
                    name,
                    figure=len(ready),
                    unit="starts",
                    target=f"optimum {belady(sequence, 2)}",
                    extra={
                        "requests": len(sequence),
                        "belady_starts": belady(sequence, 2),
                        "start_wait_s": round(waited, 2),
                        "total_s": round(total, 2),
                        "load_s": startup,
                    },
                )
            )
            orch.close(stop_workers=True)
    return rows


def main() -> None:
    """Run the three scenarios and print them."""
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = running_task(root, 30 if quick else 200)
        rows.append(start_to_ready(root, 5 if quick else 15))
        rows += mixed(root, 12 if quick else 30, 0.3)
    table = Table(title="managed model servers (median, p99; ratio = median / floor median)")
    for col in ("scenario", "variant", "value", "p99", "floor", "ratio", "floor is", "target"):
        table.add_column(col)
    table.add_column("notes")
    for row in rows:
        ms = 1000
        value = f"{row.value.median * ms:.2f} ms" if row.value else f"{row.figure:.0f} {row.unit}"
        table.add_row(
            row.scenario,
            row.variant,
            value,
            f"{row.value.p99 * ms:.2f} ms" if row.value else "",
            f"{row.floor.median * ms:.2f} ms" if row.floor else "",
            f"{row.ratio:.2f}x" if row.ratio is not None else "",
            row.floor_name,
            row.target,
            ", ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.extra.items()
            ),
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
