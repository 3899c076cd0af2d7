"""Running `sdm`: in-process through the Typer app or the console-script entry point, or as a
child process."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from typer.testing import CliRunner

import cli.app


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(*args: object) -> Outcome:
    """Run the Typer app in-process (fast; an InputError surfaces as an exception, exit code 1)."""
    result = CliRunner().invoke(cli.app.app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run_sdm(*args: object) -> Outcome:
    """Run the `sdm` entry point (`cli.app.main`) in-process, as the console script does: bad
    input gives exit code 2 and a message on stderr, an escaping exception a traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    exit_code = 0
    with (
        mock.patch.object(sys, "argv", ["sdm", *(str(arg) for arg in args)]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            cli.app.main()
        except SystemExit as exit_:
            exit_code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:  # escaped main(): the interpreter would print it and exit with 1
            traceback.print_exc()
            exit_code = 1
    return Outcome(exit_code, stdout.getvalue(), stderr.getvalue())


def run_sdm_ok(*args: object) -> Outcome:
    """`run_sdm`, which must succeed."""
    outcome = run_sdm(*args)
    assert outcome.exit_code == 0, outcome.output
    return outcome


def child_env() -> dict[str, str]:
    """The environment of a child `sdm`: a wide terminal for rich tables, no colour codes."""
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def sdm_process(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed `sdm` console script in a child process."""
    return subprocess.run(
        ["sdm", *(str(arg) for arg in args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=child_env(),
    )
