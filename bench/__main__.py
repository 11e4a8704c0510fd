"""`make bench` / `python -m bench [--quick]`: print the table and write bench/results.json."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.measure import Row
from bench.scenarios import all_scenarios


def _fmt(row: Row) -> tuple[str, str, str, str, str]:
    if row.value is None:
        figure = f"{row.figure:,.0f} {row.unit}" if row.figure is not None else ""
        return figure, "", "", "", ""
    ms = 1000
    return (
        f"{row.value.median * ms:.2f} ms",
        f"{row.value.p99 * ms:.2f} ms",
        f"{row.floor.median * ms:.2f} ms" if row.floor else "",
        f"{row.ratio:.2f}x" if row.ratio is not None else "",
        row.floor_name,
    )


def main() -> None:
    """Run every scenario and report."""
    quick = "--quick" in sys.argv
    rows = all_scenarios(quick)
    table = Table(title="orchestrator benchmarks (median, p99; ratio = median / floor median)")
    for col in (
        "scenario",
        "variant",
        "median",
        "p99",
        "floor",
        "ratio",
        "floor is",
        "target",
        "notes",
    ):
        table.add_column(col)
    for row in rows:
        notes = ", ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.extra.items()
        )
        table.add_row(row.scenario, row.variant, *_fmt(row), row.target, notes)
    Console(width=200).print(table)
    machine = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "quick": quick,
    }
    out = Path(__file__).parent / "results.json"
    out.write_text(json.dumps({"machine": machine, "rows": [r.to_json() for r in rows]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
