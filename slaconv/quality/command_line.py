"""Command-line pieces shared by the quality benchmark's modules: checked argument types, one-line errors."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from slaconv.errors import SlaconvError


def _number(text: str, kind, low: float, low_ok: bool, high: float | None = None, high_ok: bool = True):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    above_low = value >= low if low_ok else value > low
    below_high = high is None or (value <= high if high_ok else value < high)
    if not (above_low and below_high):
        lo = "[" if low_ok else "("
        hi = "inf)" if high is None else (f"{high:g}]" if high_ok else f"{high:g})")
        raise argparse.ArgumentTypeError(f"{text} is outside {lo}{low:g}, {hi}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _number(text, int, 1, True)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _number(text, int, 0, True)


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    return _number(text, float, 0, False)


def non_negative_float(text: str) -> float:
    """An argparse type: a number >= 0."""
    return _number(text, float, 0, True)


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    return _number(text, float, 0, False, 1, True)


def share(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    return _number(text, float, 0, True, 1, False)


def training_parser(description: str, *, smoke_help: str, lr_default: float | None = None) -> argparse.ArgumentParser:
    """The options every training module takes: --out, --smoke, --steps, --batch-size, --lr, --device."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--steps", type=positive_int)
    ap.add_argument("--batch-size", type=positive_int)
    ap.add_argument("--lr", type=positive_float, default=lr_default)
    ap.add_argument("--device", default="auto")
    return ap


def one_line_errors(main):
    """Wrap a module's ``main``: a :class:`SlaconvError` prints ``error: <message>`` and exits with its code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SlaconvError as exc:
            message = str(exc).replace("\n", " ")
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return wrapper


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --classifier, --out and --smoke, as the drivers that convert the trained original take them."""
    ap.add_argument("--model", required=True, type=Path, help="the trained original (diffusers folder)")
    ap.add_argument("--classifier", type=Path, help="folder written by slaconv.quality.train_classifier")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny settings for CPU tests")
