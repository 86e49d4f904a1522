"""tqdm progress bars that stay quiet when stderr is not a terminal (CI, Makefiles, --json)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, *, desc: str, enabled: bool = True, **kwargs):
    return tqdm(iterable, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True,
                leave=False, **kwargs)
