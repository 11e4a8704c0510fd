"""What a user installs is what the suite tests: the wheel, with every subpackage and file."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

import events
import orchestrator
from tests.helpers import run_command

INSTALLED = os.environ.get("ORCHESTRATOR_TEST_INSTALLED") == "1"


def test_suite_runs_against_the_installed_wheel() -> None:
    """Under `make test` the packages come from site-packages, not from a source tree."""
    if not INSTALLED:
        pytest.skip("run from the source tree; `make test` runs this suite against the wheel")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (orchestrator, events):
        assert Path(module.__file__ or "").resolve().is_relative_to(site), module.__file__


def test_every_subpackage_and_marker_ships() -> None:
    """Each directory of the source packages is importable from the install, with py.typed."""
    for package in (orchestrator, events):
        root = Path(package.__file__ or "").parent
        assert (root / "py.typed").exists(), root
    import importlib

    for name in (
        "orchestrator.backends",
        "orchestrator.backends.agent",
        "orchestrator.backends.server",
    ):
        assert importlib.import_module(name).__name__ == name


def test_every_command_imports_from_the_install(tmp_path: Path) -> None:
    """The console script and `python -m orchestrator.worker` start from any directory."""
    bindir = Path(sys.executable).parent
    out = run_command([str(bindir / "orchestrator"), "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    code = "import orchestrator.worker, orchestrator.mcp_server, orchestrator.cli"
    done = run_command([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
