"""Several orchestrator hosts on one PostgreSQL log: shared sessions, a shared registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import Orchestrator
from tests.conftest import postgres_schema
from tests.helpers import config_with

HOST_SCRIPT = """
import json, sys
from orchestrator import Orchestrator
from tests.helpers import config_with, run, set_model
url, action = sys.argv[1], sys.argv[2]
orch = Orchestrator.open(config=config_with("server"), store=url, session_id="shared")
if action == "set":
    set_model(orch, "coder", "local/echo-small")
rec = run(orch, "coder", action)
registry = [(e.host, e.status, e.model) for e in orch.task_list(view="registry")]
print(json.dumps({"response": rec.response, "registry": registry}))
orch.close()
"""


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def on_host(host: str, url: str, action: str) -> dict[str, object]:
    """Run one orchestrator process that believes it runs on `host`."""
    proc = subprocess.run(
        [sys.executable, "-c", HOST_SCRIPT, url, action],
        env={**os.environ, "ORCHESTRATOR_HOST_ID": host},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_two_hosts_share_a_session_and_see_each_others_workers(pg_url: str) -> None:
    first = on_host("host-a", pg_url, "set")
    assert first["response"] == "[local/echo-small] set"

    second = on_host("host-b", pg_url, "resume")
    # The override set on host-a applies to the same session on host-b.
    assert second["response"] == "[local/echo-small] resume"
    # host-b sees host-a's worker and its own, and did not reuse across hosts.
    assert sorted(second["registry"]) == [  # type: ignore[call-overload]
        ["host-a", "ready", "local/echo-small"],
        ["host-b", "ready", "local/echo-small"],
    ]
    with Orchestrator.open(config=config_with("server"), store=pg_url) as observer:
        rejected = observer.task_list(view="events", type="WorkerReuseRejected")
        assert [(r.data["reason"], r.data["detail"]) for r in rejected] == [
            ("other_host", "runs on host host-a, this is host-b")
        ]
        hosts = {e.host for e in observer.task_list(view="registry")}
        assert hosts == {"host-a", "host-b"}


def test_a_bad_or_unreachable_postgres_url_is_one_clear_error() -> None:
    from events.store import EventLog, StoreError

    with pytest.raises(StoreError, match="bad store URL"):
        EventLog("postgresql:///nodb-and-no-host")
    with pytest.raises(
        StoreError, match=r"^cannot open store postgresql://postgres@127\.0\.0\.1:1/x"
    ):
        EventLog("postgresql://postgres@127.0.0.1:1/x")
