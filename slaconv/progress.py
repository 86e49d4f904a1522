"""Progress for long loops: a tqdm bar on a terminal, a logged line per interval elsewhere.

On a terminal the bar is transient; when stderr is not one (CI, Makefiles, a redirected log) a line
``<desc>: <done>/<total> (<postfix>)`` is logged at most every ``interval`` seconds.  Either way, a
finished loop logs one summary line, so a stage never ends without a trace.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LINE_INTERVAL_S = 30.0


class Progress:
    """Iterates over ``iterable`` and reports progress; ``set_postfix`` adds the latest metrics to the lines."""

    def __init__(self, iterable: Iterable, *, desc: str, enabled: bool = True, total: int | None = None,
                 initial: int = 0, interval: float = LINE_INTERVAL_S):
        self.iterable, self.desc, self.enabled, self.interval = iterable, desc, enabled, interval
        self.total = total if total is not None else _length(iterable, initial)
        self.done, self.initial, self.postfix = initial, initial, ""
        self.bar = (tqdm(total=self.total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
                    if enabled and sys.stderr.isatty() else None)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix)

    def _line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.desc}: {self.done}{total}" + (f" ({self.postfix})" if self.postfix else "")

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        try:
            for item in self.iterable:
                yield item
                self.done += 1
                if self.bar is not None:
                    self.bar.update(1)
                elif self.enabled and time.monotonic() - last >= self.interval:
                    last = time.monotonic()
                    logger.info(self._line())
        finally:
            if self.bar is not None:
                self.bar.close()
        if self.enabled and self.done > self.initial:
            logger.info(f"{self._line()}, {time.monotonic() - start:.1f} s")


def _length(iterable: Iterable, initial: int) -> int | None:
    try:
        return initial + len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(iterable: Iterable, *, desc: str, enabled: bool = True, **kwargs) -> Progress:
    """:class:`Progress` over ``iterable`` (``total``, ``initial`` and ``interval`` as keywords)."""
    return Progress(iterable, desc=desc, enabled=enabled, **kwargs)
