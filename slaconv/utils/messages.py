"""Turning exceptions and names into the one-line messages the CLI prints."""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def looks_local(name: str) -> bool:
    """Whether ``name`` means a local path rather than a Hub id ("name" or "org/name")."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
