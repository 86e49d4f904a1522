"""Downloading from the Hub with slaconv's errors: one place maps huggingface_hub's exceptions."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HubError, InputError
from .utils.messages import first_line, looks_local


def fetch_snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                   token: str | None = None, offline: bool = False, what: str = "model") -> Path:
    """``snapshot_download`` -> local folder.  A local-looking name that does not exist, a missing repo or
    revision, or (offline) a missing cache entry is an :class:`InputError` (exit 3); anything network-side,
    including an unreachable Hub with nothing cached, a :class:`HubError` (exit 5)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if looks_local(repo_id):
        raise InputError(f"{what} path '{repo_id}' does not exist")
    offline = offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                                      local_files_only=offline))
    except RepositoryNotFoundError:
        raise InputError(f"{what} '{repo_id}' not found (no such local path or Hub repo, or no access)") from None
    except RevisionNotFoundError:
        raise InputError(f"revision '{revision}' not found in '{repo_id}'") from None
    except LocalEntryNotFoundError:
        if offline:
            raise InputError(f"{what} '{repo_id}' is not a local path and not in the Hub cache (offline)") from None
        raise HubError(f"could not reach the Hub for '{repo_id}' and it is not in the Hub cache "
                       "(check the network, or pass --offline to use local paths only)") from None
    except Exception as exc:  # network failures of every flavour
        raise HubError(f"could not download '{repo_id}': {type(exc).__name__}: {first_line(exc)}") from None
