"""Runs ``slaconv`` verbs for the quality table: in-process through Click's CliRunner, or as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback

from click.testing import CliRunner

from slaconv.cli import main as slaconv_main
from slaconv.errors import EXIT_CODES, EXIT_INTERNAL, SlaconvError
from slaconv.quality.common import Timer


class StepFailed(SlaconvError):
    """A ``slaconv`` verb exited with a code the table did not expect; ``output`` holds its last output."""

    def __init__(self, message: str, exit_code: int, output: str):
        super().__init__(message)
        self.exit_code = exit_code if exit_code in EXIT_CODES and exit_code else EXIT_INTERNAL
        self.output = output


def error_line(stderr: str, stdout: str) -> str:
    """The line that says why a verb failed: its ``error:`` line, else the last line it printed."""
    lines = [line.strip() for line in (stderr or stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


class SlaconvCLI:
    """Runs ``slaconv`` verbs with ``--offline -q --json --device DEVICE`` and returns their JSON report.

    Every call is recorded in ``calls`` (argv, exit code, seconds) and logged through ``log``.
    """

    def __init__(self, subprocess_mode: bool, device: str, log):
        self.subprocess_mode, self.device, self.log = subprocess_mode, device, log
        self.calls: list[dict] = []

    def __call__(self, *args: str, ok_codes=(0,)) -> dict:
        argv = ["--offline", "-q", *args, "--json", "--device", self.device]
        timer = Timer()
        if self.subprocess_mode:
            proc = subprocess.run([sys.executable, "-m", "slaconv", *argv], capture_output=True, text=True)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        else:
            result = CliRunner().invoke(slaconv_main, argv, catch_exceptions=True)
            code, stdout = result.exit_code, result.stdout
            try:
                stderr = result.stderr
            except ValueError:
                stderr = ""
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                stderr += "".join(traceback.format_exception(result.exception))
        seconds = timer()
        self.calls.append({"argv": ["slaconv", *argv], "exit_code": code, "seconds": round(seconds, 2)})
        self.log(f"  $ slaconv {' '.join(args)}  -> exit {code}, {seconds:.1f} s")
        if code not in ok_codes:
            raise StepFailed(f"`slaconv {' '.join(args)}` exited {code}: {error_line(stderr, stdout)}", code,
                             f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}")
        try:
            start = stdout.index("{")
            return json.loads(stdout[start:])
        except ValueError:
            return {}


def stage_summary(report: dict) -> dict:
    """The per-stage summaries of a ``calibrate`` report."""
    return {k: report[k] for k in ("stage1", "stage2") if k in report}
