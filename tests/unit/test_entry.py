"""The ``snapsync`` entry point: a replication session (``serve``) starts without the command line's
libraries, since it is paid per session; everything else still reaches the full command line."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("typer", "rich", "pydantic")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; sys.argv = ['snapsync', *{list(args)!r}]; from snapsync.cli.entry import main; main()"
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, input="", timeout=60)


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


def test_serve_imports_none_of_the_cli_libraries() -> None:
    done = _run("serve", "--root", "/nonexistent-root", "--role", "receive")
    assert '"ok":false' in done.stdout and "does not exist" in done.stdout  # it answered, as a session does
    assert not _imported(done.stderr) & set(HEAVY), sorted(_imported(done.stderr) & set(HEAVY))


def test_everything_else_and_unusual_serve_options_reach_the_full_cli() -> None:
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip()
    assert "typer" in _imported(version.stderr)
    helped = _run("serve", "--help")
    assert helped.returncode == 0 and "--root" in helped.stdout
