"""``slaconv push``: package a work directory (model card, checksums) and upload it to the Hub.

What is uploaded (and nothing else): ``config.json``, ``diffusion_pytorch_model*.safetensors`` (+ the
shard index), ``sla2.safetensors``, ``sla2_config.json``, ``recipe.yaml``, ``README.md``,
``checksums.sha256`` and every file under ``reports/``. ``checkpoints/``, ``logs/`` and any other file
stay local. Remote weight shards/indexes and ``reports/`` files that this push does not re-upload are
deleted in the same commit, so a re-push with different sharding never leaves a stale mix behind.

Where the card and checksums go: **into the work directory itself** (``README.md`` and
``checksums.sha256``, each written to a temporary name and renamed). These are the only two files
push ever writes; the work dir then matches the Hub repo file for file, so ``verify_checksums`` works
on it locally too. A ``README.md`` that does not carry :data:`slaconv.modelcard.CARD_MARKER` is
treated as hand-written and uploaded unchanged. ``dry_run`` writes nothing and makes no request.

Tokens: taken from ``token=`` or huggingface_hub's usual resolution (``HF_TOKEN``, cached login);
never printed, logged or put into an error message.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .checksums import CHECKSUMS_FILE, write_checksums
from .config import ROW_WEIGHT_MIXINGS, SLA2Config
from .errors import HubError, InputError, UsageError
from .modelcard import CARD_MARKER, build_model_card
from .utils.files import write_text_atomic
from .validation_state import ValidationState, require_validated, validation_state
from .workdir import HEDGEHOG_TENSORS, QUERY_LINEAR_TENSORS, SLA2_TENSORS, WorkDir

README = "README.md"
REQUIRED = (WorkDir.MODEL_CONFIG, WorkDir.SLA2_STATE, WorkDir.SLA2_CONFIG)
OPTIONAL_TOP = (WorkDir.RECIPE,)
EXCLUDED_DIRS = (WorkDir.CHECKPOINTS, WorkDir.LOGS)
_WEIGHTS_STEM = WorkDir.WEIGHTS.removesuffix(".safetensors")
# Remote files matching these but not re-uploaded are deleted by the push commit.
STALE_PATTERNS = [
    f"{_WEIGHTS_STEM}*.safetensors",
    f"{_WEIGHTS_STEM}*.safetensors.index.json",
    f"{WorkDir.REPORTS}/*",
]
_TRUE = {"1", "on", "yes", "true"}


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file is complete.

    Reads only the header (no tensor data, no torch): a truncated copy, a pickle renamed to
    ``.safetensors`` or a header whose offsets point past the end of the file raise :class:`InputError`.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or 8 + n > size or n > 100 * 1024 * 1024:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not 0 <= begin <= stop:
                raise ValueError(f"bad offsets for {key}")
            end = max(end, stop)
        if 8 + n + end != size:
            raise ValueError(f"size {size} does not match the header ({8 + n + end} bytes expected)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a complete safetensors file ({e})") from None
    return header


def _check_sla2_tensors(work: WorkDir, layers: tuple[str, ...], attention: SLA2Config) -> None:
    """Every layer listed in sla2_config.json has router_q, router_k and alpha_logit (and with the hedgehog
    feature map feature_q and feature_k, with ``mixing: query-linear`` or ``query-block`` alpha_weight) in
    sla2.safetensors."""
    keys = set(read_safetensors_header(work.sla2_state_path)) - {"__metadata__"}
    leaves = (SLA2_TENSORS + (HEDGEHOG_TENSORS if attention.feature_map == "hedgehog" else ())
              + (QUERY_LINEAR_TENSORS if attention.mixing in ROW_WEIGHT_MIXINGS else ()))
    for layer in layers:
        for leaf in leaves:
            if f"{layer}.{leaf}" not in keys:
                raise InputError(
                    f"{work.sla2_state_path} lacks {layer}.{leaf} (listed in {WorkDir.SLA2_CONFIG} layers)"
                )


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Resolve ``workdir`` and check it holds a converted model; :class:`InputError` otherwise.

    Checks: the required files exist, ``sla2_config.json`` reads (:meth:`WorkDir.read_sla2_config`), every
    weight file (and every shard the index names) is a complete safetensors file, and ``sla2.safetensors``
    holds the learned tensors of every listed layer. Only headers are read.
    """
    root = Path(workdir).expanduser()
    if not root.is_dir():
        raise InputError(f"work directory {root} does not exist")
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root} is not a slaconv work directory: missing {', '.join(missing)}")
    work = WorkDir(root)
    config = work.read_sla2_config()
    for name in WorkDir(root).weight_files():
        if name.endswith(".safetensors"):
            read_safetensors_header(root / name)
    _check_sla2_tensors(work, config.layers, config.attention)
    return root.resolve()


def collect_files(workdir: str | os.PathLike) -> list[str]:
    """Sorted relative POSIX paths that a push uploads, including README.md and checksums.sha256.

    The work dir must already pass :func:`check_workdir`. README.md and checksums.sha256 are listed
    whether or not they exist yet (push writes them).
    """
    root = Path(workdir)
    files = {*REQUIRED, *WorkDir(root).weight_files(), README, CHECKSUMS_FILE}
    files.update(name for name in OPTIONAL_TOP if (root / name).is_file())
    reports = root / WorkDir.REPORTS
    if reports.is_dir():
        for path in reports.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                files.add(rel)
    return sorted(files)


def _pattern(rel: str) -> str:
    """An fnmatch pattern matching exactly ``rel``."""
    return re.sub(r"([*?\[])", r"[\1]", rel)


def _card_state(root: Path) -> str:
    """'user' when README.md exists without the slaconv marker (kept as is), else 'generated'."""
    readme = root / README
    if readme.is_file():
        try:
            text = readme.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return "user"
        if CARD_MARKER not in text:
            return "user"
    return "generated"


def _card_text(root: Path, card_state: str, repo_id: str, validation: ValidationState) -> str:
    if card_state == "generated":
        return build_model_card(root, repo_id=repo_id, validation=validation)
    return (root / README).read_text(encoding="utf-8")


def _scrub(text: str, secrets: list[str]) -> str:
    """One line, no secrets, bounded length."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{6,}", "hf_***", text)
    text = re.sub(r"(?i)(authorization:?\s*bearer\s+)\S+", r"\1***", text)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_error(err: BaseException, *, repo_id: str, endpoint: str, token_given: bool, secrets: list[str]) -> HubError:
    """Translate a huggingface_hub / httpx2 exception into a one-line :class:`HubError`."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(err, OfflineModeIsEnabled):
        return HubError("cannot push while offline (HF_HUB_OFFLINE=1): unset it to upload")
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        detail = err.server_message or ""
        if not detail and response is not None:
            detail = response.headers.get("X-Error-Message", "")
        detail = f": {detail}" if detail else ""
        if status == 401:
            hint = ("no token found: pass --token, set HF_TOKEN or run `hf auth login`" if not token_given
                    else "the token is invalid or expired")
            msg = f"Hub authentication failed (401) for {repo_id}{detail}; {hint}"
        elif status == 403:
            msg = f"Hub refused access (403) to {repo_id}{detail}; the token needs write access to that namespace"
        elif isinstance(err, RepositoryNotFoundError) or status == 404:
            msg = f"Hub repository or revision not found (404) for {repo_id}{detail}"
        elif status is not None and status >= 500:
            msg = f"Hub server error ({status}) while pushing {repo_id}{detail}; try again later"
        else:
            msg = f"Hub request failed ({status}) while pushing {repo_id}{detail}"
        return HubError(_scrub(msg, secrets))
    if isinstance(err, httpx2.HTTPError):
        return HubError(_scrub(f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err})", secrets))
    return HubError(_scrub(f"Hub push of {repo_id} failed: {err}", secrets))


def push(
    workdir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    allow_unvalidated: bool = False,
    allow_failed_validation: bool = False,
) -> dict[str, Any]:
    """Upload a slaconv work directory to the Hub repo ``repo_id`` and return a summary dict.

    Steps: check the work dir (:class:`InputError` if it is not a converted model) and its validation
    (:func:`slaconv.validation_state.require_validated`: a model without a current validation -- never
    validated, or weights or settings changed since -- is refused unless ``allow_unvalidated``, one whose
    current validation failed unless ``allow_failed_validation``; the card then says so), refuse offline
    mode, create the repo if needed (``private`` applies on creation; pushing with ``private=True``
    to an existing *public* repo is refused), create branch ``revision`` if it does not exist, write
    ``README.md`` (unless hand-written) and ``checksums.sha256`` into the work dir, then upload the
    files listed by :func:`collect_files` in one ``upload_folder`` call (``create_pr=True`` opens a
    pull request against the default branch instead of committing to it). A push that changes
    nothing makes no commit (and opens no PR) and reports the current head commit.

    Returns ``{"repo_id", "revision", "commit_oid", "commit_url", "pr_url", "files", "card",
    "private", "endpoint", "dry_run", "validation"}`` (plus ``"card_text"`` when ``dry_run``). ``dry_run=True``
    validates and lists without writing anything or making a request.

    Raises :class:`InputError` (bad work dir), :class:`UnvalidatedError` and :class:`QualityGateError` (see
    above), :class:`UsageError` (malformed ``repo_id``, or
    ``create_pr`` with a ``revision``), :class:`HubError` (offline mode, network, authentication or
    any Hub-side failure; one line, never containing the token).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    root = check_workdir(workdir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"invalid repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')") from None
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against the default branch: drop --revision")
    if create_pr:
        revision = None

    validation = validation_state(WorkDir(root))
    require_validated(validation, allow_unvalidated=allow_unvalidated,
                      allow_failed_validation=allow_failed_validation)
    files = collect_files(root)
    card_state = _card_state(root)
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit_oid": None,
        "commit_url": None,
        "pr_url": None,
        "files": files,
        "card": card_state,
        "private": bool(private),
        "endpoint": endpoint,
        "dry_run": bool(dry_run),
        "validation": validation.to_dict(),
    }
    if dry_run:
        from huggingface_hub import constants

        result["endpoint"] = endpoint or constants.ENDPOINT
        result["card_text"] = _card_text(root, card_state, repo_id, validation)
        return result
    if _offline():
        raise HubError("cannot push while offline (HF_HUB_OFFLINE=1): unset it to upload")

    from huggingface_hub import HfApi, get_token

    from . import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="slaconv", library_version=__version__)
    result["endpoint"] = api.endpoint
    implicit = None
    if token is None:
        try:
            implicit = get_token()
        except Exception:  # an OIDC/OAuth refresh failure surfaces through the client instead
            implicit = None
    secrets = [s for s in (token, implicit) if isinstance(s, str)]
    token_given = bool(token or implicit)
    try:
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        repo_id = getattr(repo_url, "repo_id", None) or repo_id  # "NAME" -> "user/NAME"
        result["repo_id"] = repo_id
        if private:
            info = api.repo_info(repo_id, repo_type="model")
            if info.private is False:
                raise HubError(
                    f"{repo_id} already exists and is public: refusing to upload with --private "
                    "(make the repo private first, or push without --private)"
                )
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")

        # The only two files push writes into the work dir (see the module docstring).
        if card_state == "generated":
            write_text_atomic(root / README, _card_text(root, card_state, repo_id, validation))
        write_checksums(root, [f for f in files if f != CHECKSUMS_FILE])

        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=root,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload SLA2 model with slaconv {__version__}",
            allow_patterns=[_pattern(f) for f in files],
            ignore_patterns=[f"{d}/*" for d in EXCLUDED_DIRS],
            delete_patterns=STALE_PATTERNS,
        )
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - everything from the client becomes one HubError
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if not isinstance(err, (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, ValueError)):
            raise
        raise _hub_error(
            err, repo_id=repo_id, endpoint=api.endpoint, token_given=token_given, secrets=secrets
        ) from None
    result["commit_oid"] = info.oid
    result["commit_url"] = info.commit_url
    result["pr_url"] = info.pr_url
    if info.pr_url:
        result["revision"] = info.pr_revision or result["revision"]
    return result
