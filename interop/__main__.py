"""Install the interop peers, each into its own environment (`python -m interop install`).

`make interop` runs this with the developer's Python before it runs the interop tests
against the installed wheel. Every peer named in peers.toml is installed from its registry
into a directory of its own, and the outcome is written to `status.json` there: a peer that
could not be installed is recorded with a one-line reason, which its tests show when they
skip. Only the standard library is used, so any Python 3.11 can run it.

`python -m interop lock` rewrites package-lock.json after the npm peer's version changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers.toml"
LOCK = HERE / "package-lock.json"
STAMP = ".interop-installed"
# A registry that neither answers nor refuses must not hold the build: a peer whose install
# takes longer than this is skipped.
INSTALL_TIMEOUT = 1200.0


class InstallError(Exception):
    """A peer could not be installed; the message is the one line its tests show."""


def load_peers() -> dict[str, dict[str, str]]:
    """The peers and their pins, from peers.toml."""
    with PEERS.open("rb") as f:
        return {name: dict(spec) for name, spec in tomllib.load(f).items()}


def npm_manifest(spec: dict[str, str]) -> dict[str, Any]:
    """The package.json the npm peer is installed from (its version comes from peers.toml)."""
    return {
        "name": "orchestrator-interop-peers",
        "private": True,
        "dependencies": {spec["package"]: spec["version"]},
    }


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise InstallError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        shown = " ".join(cmd[:4])
        raise InstallError(f"`{shown}` did not finish in {INSTALL_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise InstallError(_why(done.stdout + done.stderr, cmd))


def _why(output: str, cmd: list[str]) -> str:
    """The line of an installer's output that says why it failed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    pip_errors = [line for line in lines if line.startswith("ERROR:")]
    if pip_errors:
        return next((e for e in pip_errors if "No matching distribution" in e), pip_errors[-1])
    npm_errors = [
        said
        for line in lines
        if line.startswith("npm error")
        and (said := line.removeprefix("npm error").strip())
        and not said.startswith("code ")
    ]
    if npm_errors:
        if "are in sync" in npm_errors[0]:
            return f"{LOCK.name} does not match peers.toml: run `python -m interop lock`"
        return npm_errors[0]
    tail = lines[-1] if lines else "no output"
    return f"`{' '.join(cmd[:4])}` failed: {tail}"


def _pin(spec: dict[str, str]) -> str:
    if spec["registry"] == "npm":
        digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16] if LOCK.exists() else "-"
        return f"{spec['package']}@{spec['version']} lock {digest}"
    return spec["requirement"]


def _install_pypi(spec: dict[str, str], home: Path, python: str) -> Path:
    _run([python, "-m", "venv", str(home)])
    pip = [str(home / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--upgrade", "pip"])
    _run([*pip, "install", "--quiet", spec["requirement"]])
    return home / "bin" / spec["command"]


def _install_npm(spec: dict[str, str], home: Path) -> Path:
    if not LOCK.exists():
        raise InstallError(f"{LOCK.name} is missing: run `python -m interop lock`")
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not on PATH (install Node.js and npm)")
    home.mkdir(parents=True)
    (home / "package.json").write_text(json.dumps(npm_manifest(spec), indent=2) + "\n")
    shutil.copy(LOCK, home / "package-lock.json")
    # `npm ci` installs exactly the lockfile, and fails if it no longer matches the pin.
    _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=home)
    return home / "node_modules" / ".bin" / spec["command"]


def install(name: str, spec: dict[str, str], root: Path, python: str) -> dict[str, Any]:
    """Install one peer under root/name (kept when its pin is unchanged); its status row."""
    home = root / name
    pin = _pin(spec)
    row: dict[str, Any] = {"name": name, "pin": pin, "ok": False, "reason": None}
    stamp = home / STAMP
    started = time.monotonic()
    try:
        command = home / "bin" / spec["command"]
        if spec["registry"] == "npm":
            command = home / "node_modules" / ".bin" / spec["command"]
        if stamp.exists() and stamp.read_text() == pin and command.exists():
            row.update(ok=True, command=str(command), reused=True)
            return row
        shutil.rmtree(home, ignore_errors=True)
        if spec["registry"] == "npm":
            command = _install_npm(spec, home)
        elif spec["registry"] == "pypi":
            command = _install_pypi(spec, home, python)
        else:
            raise InstallError(f"peers.toml: {name}.registry: must be pypi or npm")
        if not command.exists():
            raise InstallError(f"installed, but it has no command {spec['command']}")
        stamp.write_text(pin)
        row.update(ok=True, command=str(command), reused=False)
    except InstallError as exc:
        row["reason"] = f"{pin}: {exc}"
    finally:
        row["seconds"] = round(time.monotonic() - started, 1)
    return row


def cmd_install(root: Path, python: str) -> int:
    """Install every peer, one after the other (on two cores, at once was no faster), and
    write status.json."""
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, spec in load_peers().items():
        row = rows[name] = install(name, spec, root, python)
        if not row["ok"]:
            print(f"interop: {row['name']}: NOT INSTALLED, its tests skip: {row['reason']}")
        elif row["reused"]:
            print(f"interop: {row['name']}: {row['pin']} (already installed)")
        else:
            print(f"interop: {row['name']}: {row['pin']} installed in {row['seconds']:g} s")
    (root / "status.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_lock() -> int:
    """Rewrite package-lock.json for the npm peers' pins in peers.toml."""
    npm = shutil.which("npm")
    if npm is None:
        print("interop: npm is not on PATH", file=sys.stderr)
        return 2
    (spec,) = [s for s in load_peers().values() if s["registry"] == "npm"]
    work = Path(HERE.parent / "build" / "interop" / "lock")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "package.json").write_text(json.dumps(npm_manifest(spec), indent=2) + "\n")
    try:
        _run([npm, "install", "--package-lock-only", "--no-audit", "--no-fund"], cwd=work)
    except InstallError as exc:
        print(f"interop: {exc}", file=sys.stderr)
        return 1
    shutil.copy(work / "package-lock.json", LOCK)
    print(f"interop: wrote {LOCK.relative_to(HERE.parent)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m interop install --into DIR [--python PY]` or `python -m interop lock`."""
    parser = argparse.ArgumentParser(prog="python -m interop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install every peer, each into its own environment")
    inst.add_argument("--into", type=Path, required=True, help="directory for the peers")
    inst.add_argument("--python", default=sys.executable, help="Python for the PyPI peers")
    sub.add_parser("lock", help="rewrite package-lock.json from peers.toml")
    args = parser.parse_args(argv)
    if args.command == "lock":
        return cmd_lock()
    return cmd_install(args.into.resolve(), args.python)


if __name__ == "__main__":
    sys.exit(main())
