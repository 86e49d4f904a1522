"""Logging for the library and the CLI: one logger per module, quiet on every process but the first.

Modules log through ``logging.getLogger(__name__)``; nothing is printed until an application configures
handlers.  The CLI calls :func:`configure_logging`, which writes ``slaconv`` records to stderr and, under
``accelerate launch`` or ``torchrun`` (several processes), keeps only the main process's records unless a
record asks for every rank with ``extra={"all_ranks": True}``; those carry a ``[rank N]`` prefix.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "slaconv"


def process_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``), 0 when not launched distributed."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class MainProcessFilter(logging.Filter):
    """Drop records on ranks other than 0, except those logged with ``extra={"all_ranks": True}``."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        record.rank_prefix = f"[rank {rank}] " if getattr(record, "all_ranks", False) and rank else ""
        return rank == 0 or bool(getattr(record, "all_ranks", False))


def configure_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """Send the package's log records to stderr: warnings only with ``quiet``, debug with ``verbose``."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "slaconv_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.slaconv_cli = True
    handler.addFilter(MainProcessFilter())
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
