"""Letting a function see every SLA2 layer's Q, K and V during a forward pass.

An observer is called by each SLA2 processor with ``(processor, q, k, v)`` (tensors in the
(B, N, H, D) layout) before the processor attends; whatever it returns (if not None) becomes that
layer's output.  :func:`observing` installs one observer on a set of processors for the duration
of a ``with`` block and removes it again however the block ends, so an error mid-forward never
leaves a model that keeps calling it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .install import sla2_processors
from .processor import Observer, SLA2Processor


@contextmanager
def observing(processors: Iterable[SLA2Processor], observer: Observer) -> Iterator[None]:
    """Set ``observer`` on each of ``processors`` inside the block; clear it on exit, error or not."""
    procs = list(processors)
    for proc in procs:
        proc.observer = observer
    try:
        yield
    finally:
        for proc in procs:
            proc.observer = None


def observe_attention(model: torch.nn.Module, observer: Observer):
    """:func:`observing` on every SLA2 processor installed in ``model``."""
    return observing(sla2_processors(model).values(), observer)
