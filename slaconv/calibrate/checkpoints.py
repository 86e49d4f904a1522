"""A stage's checkpoints (``checkpoints/stage<n>/checkpoint-<step>/``) and its JSONL step log.

Each checkpoint holds the training state (``state.safetensors`` + ``state.json``), ``run.json`` naming the run
that wrote it (:mod:`.runs`) and, written last, a ``COMPLETE`` marker; each log record names its run too.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

from ..errors import DiskFullError, InputError
from ..statefile import load_state, save_state
from ..utils.files import atomic_dir, read_json

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")
RUN_FILE = "run.json"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(root: Path, step: int, state: dict, limit: int, run_id: str, keep: int | None = None) -> Path:
    """Write ``checkpoint-<step>/`` of run ``run_id`` atomically (a ``COMPLETE`` marker last), then prune all
    but the newest ``limit`` ones and checkpoint ``keep`` (the state the run may end up keeping)."""
    final = root / f"checkpoint-{step}"
    try:
        with atomic_dir(final) as tmp:
            save_state(tmp, state)
            (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id, "stage": _stage_of(root), "step": step}))
            (tmp / "COMPLETE").write_text(f"{step}\n")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        kept = ", ".join(p.name for _, p in list_checkpoints(root)) or "no checkpoint"
        raise DiskFullError(f"the disk is full: {final.name} was not written (nothing of it kept); {root} keeps "
                            f"{kept} and the work dir's weights are unchanged; free space, then rerun with "
                            "--resume latest") from None
    found = list_checkpoints(root)
    for old_step, old in found[:-limit]:
        if old_step != keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_run(path: Path) -> dict:
    """``run.json`` of a checkpoint: ``run_id``, ``stage`` and ``step`` (``run_id`` None for a checkpoint written
    before runs had identities)."""
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        step = CHECKPOINT_RE.match(path.name)
        return {"run_id": None, "stage": _stage_of(path.parent), "step": int(step.group(1)) if step else 0}
    return read_json(path / RUN_FILE)


def _stage_of(root: Path) -> int | None:
    """The stage whose checkpoints ``root`` (``.../stage<n>``) holds."""
    match = re.fullmatch(r"stage(\d)", Path(root).name)
    return int(match.group(1)) if match else None


def find_checkpoint(root: Path, resume: str) -> tuple[int, Path] | None:
    """(step, path) of the checkpoint ``resume`` names: ``latest`` under ``root`` (None if there is none) or a
    checkpoint folder's path (:class:`InputError` if it is not a complete one)."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise InputError(f"{path} is not a complete checkpoint")
    return checkpoint_run(path)["step"], path


def read_checkpoint(path: Path) -> dict:
    """The training state of the checkpoint folder ``path``; a corrupt one is an :class:`InputError` naming its
    file and the other complete checkpoints beside it (any of them resumes with ``--resume PATH``)."""
    path = Path(path)
    try:
        return load_state(path)
    except InputError as exc:
        others = [p.name for _, p in list_checkpoints(path.parent) if p.name != path.name]
        hint = (f"the other complete checkpoints ({', '.join(others)}) resume with --resume {path.parent}/NAME"
                if others else "no other complete checkpoint is left; start the run again with --overwrite")
        raise InputError(f"{exc}; {hint}") from None


def load_checkpoint(root: Path, resume: str) -> tuple[int, dict] | None:
    """(step, state) of the checkpoint ``resume`` names (see :func:`find_checkpoint`)."""
    found = find_checkpoint(root, resume)
    return None if found is None else (found[0], read_checkpoint(found[1]))


def append_log(path: Path, record: dict) -> None:
    """Append one step's record to a JSONL log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def restart_log(path: Path, step: int, run_id: str) -> None:
    """Prepare the log of run ``run_id`` starting at ``step``: a fresh run (step 0) removes the old log, a
    resumed one keeps only its own records up to ``step`` (it logs the later steps again)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step and json.loads(line).get("run_id") == run_id]
    path.write_text("".join(line + "\n" for line in kept))


def first_last_loss(log_path: Path) -> tuple[float | None, float | None]:
    """Mean loss over the first and the last tenth of the logged steps (single steps are noisy)."""
    if not log_path.exists():
        return None, None
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x]
    if not lines:
        return None, None
    key = "loss_rel_mse_mean" if "loss_rel_mse_mean" in lines[0] else "loss"
    values = [x[key] for x in lines]
    w = max(1, len(values) // 10)
    return sum(values[:w]) / w, sum(values[-w:]) / w
