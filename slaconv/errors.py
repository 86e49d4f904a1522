"""Errors a user can cause, each mapped to a documented exit code.

The CLI catches :class:`SlaconvError` and prints ``error: <message>`` on one line, then exits
with the error's ``exit_code``; anything else is a bug and keeps its traceback (exit 1).
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_GATE = 4
EXIT_HUB = 5
EXIT_DIVERGED = 6
EXIT_OUTPUT = 7
EXIT_OOM = 8
EXIT_UNVALIDATED = 9
EXIT_DISK_FULL = 10

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the traceback)",
    EXIT_USAGE: "bad command line or recipe (unknown option or key, value out of range)",
    EXIT_INPUT: "input not found or not usable (model, work dir, data, safetensors file)",
    EXIT_GATE: "validation ran but a quality gate failed",
    EXIT_HUB: "Hugging Face Hub error (network, authentication, offline mode)",
    EXIT_DIVERGED: "training diverged or left the model worse than it started; the work dir keeps its weights",
    EXIT_OUTPUT: "output directory already holds something else",
    EXIT_OOM: "out of memory (the message says what to change)",
    EXIT_UNVALIDATED: "no current validation: never validated, or the weights changed since (push refuses it)",
    EXIT_DISK_FULL: "disk full while writing (the message says what was kept)",
}


class SlaconvError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = EXIT_INTERNAL


class UsageError(SlaconvError):
    """A command line or API call asks for something slaconv does not do."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A recipe has unknown keys or values out of range."""


class InputError(SlaconvError):
    """A model, work dir, data dir or file is missing or not usable."""

    exit_code = EXIT_INPUT


class UnsupportedModelError(InputError):
    """The model loads but is not a DiT family slaconv knows how to convert."""


class QualityGateError(SlaconvError):
    """Validation ran and a quality gate failed."""

    exit_code = EXIT_GATE


class HubError(SlaconvError):
    """The Hugging Face Hub could not be reached, refused the request, or the model is not cached offline."""

    exit_code = EXIT_HUB


class DivergedError(SlaconvError):
    """Calibration diverged or left the model worse than it started; the work dir keeps its weights."""

    exit_code = EXIT_DIVERGED


class OutputExistsError(SlaconvError):
    """The output directory already holds something slaconv will not overwrite unasked."""

    exit_code = EXIT_OUTPUT


class OutOfMemoryError(SlaconvError):
    """The device ran out of memory; the message says which setting to lower."""

    exit_code = EXIT_OOM


class UnvalidatedError(SlaconvError):
    """No validation measured the model as it is now (never validated, stale, or of unknown freshness)."""

    exit_code = EXIT_UNVALIDATED


class DiskFullError(SlaconvError):
    """A write ran out of disk space; the message says what was kept."""

    exit_code = EXIT_DISK_FULL
