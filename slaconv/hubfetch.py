"""Downloading from the Hub with slaconv's errors: one place maps huggingface_hub's exceptions."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HubError, InputError
from .utils.messages import first_line


def fetch_snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                   token: str | None = None, offline: bool = False, what: str = "model") -> Path:
    """``snapshot_download`` -> local folder; a missing repo, revision or cache entry is an
    :class:`InputError` (exit 3), anything network-side a :class:`HubError` (exit 5)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                                      local_files_only=offline or os.environ.get("HF_HUB_OFFLINE") == "1"))
    except RepositoryNotFoundError:
        raise InputError(f"{what} '{repo_id}' not found (no such local path or Hub repo, or no access)") from None
    except RevisionNotFoundError:
        raise InputError(f"revision '{revision}' not found in '{repo_id}'") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{what} '{repo_id}' is not a local path and not in the Hub cache (offline)") from None
    except Exception as exc:  # network failures of every flavour
        raise HubError(f"could not download '{repo_id}': {type(exc).__name__}: {first_line(exc)}") from None
