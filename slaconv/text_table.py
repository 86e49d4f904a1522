"""Plain-text tables for the terminal: aligned, labelled columns and numbers to 4 significant digits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# how a summary key ends -> the unit its value is in
_UNITS = (("_gb_per_rank_training", "GB"), ("_gb_per_rank", "GB"), ("_gb", "GB"), ("_db", "dB"),
          ("seconds", "s"), ("_s", "s"))


def number(value) -> str:
    """``value`` for reading: floats to 4 significant digits, lists item by item, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(v) for v in value)
    return str(value)


def unit_of(key: str) -> str:
    """The unit a summary field is in, read from its name (``peak_gpu_memory_gb`` -> ``GB``); ``""`` if none."""
    return next((unit for suffix, unit in _UNITS if key.endswith(suffix)), "")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """``rows`` under ``header`` in columns as wide as their widest cell: the first left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def fields(summary: Mapping, skip: Sequence[str] = (), indent: str = "  ") -> list[str]:
    """A flat summary as a ``field / value / unit`` table; nested mappings as ``outer.inner`` fields."""
    rows = []

    def add(prefix, mapping):
        for key, value in mapping.items():
            if key in skip:
                continue
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                add(f"{name}.", value)
            else:
                rows.append([name, number(value), unit_of(key)])

    add("", summary)
    return table(["field", "value", "unit"], rows, indent) if rows else []
