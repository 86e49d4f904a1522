"""A stage's checkpoints (``checkpoints/stage<n>/checkpoint-<step>/``) and its JSONL step log."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from ..errors import DivergedError, InputError
from ..statefile import load_state, save_state
from ..utils.files import atomic_dir

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


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


def save_checkpoint(root: Path, step: int, state: dict, limit: int) -> Path:
    """Write ``checkpoint-<step>/`` atomically (a ``COMPLETE`` marker last), then prune old ones."""
    final = root / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_state(tmp, state)
        (tmp / "COMPLETE").write_text(f"{step}\n")
    for _, old in list_checkpoints(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, resume: str) -> tuple[int, dict] | None:
    """(step, state) of the checkpoint ``resume`` names: ``latest`` under ``root`` (None if there is
    none yet) or a checkpoint folder's path."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            return None
        step, path = found[-1]
    else:
        path = Path(resume)
        if not (path / "COMPLETE").is_file():
            raise InputError(f"{path} is not a complete checkpoint")
        step = int(CHECKPOINT_RE.match(path.name).group(1)) if CHECKPOINT_RE.match(path.name) else 0
    return step, load_state(path)


def check_finite(value: float, what: str, ckpt_root: Path) -> None:
    """Stop with :class:`DivergedError`, naming the last good checkpoint, when ``value`` is not finite."""
    if not math.isfinite(value):
        found = list_checkpoints(ckpt_root)
        kept = f"; last good checkpoint: {found[-1][1]}" if found else "; no checkpoint was written yet"
        raise DivergedError(f"{what} became {value}{kept} (lower the learning rate)")


def append_log(path: Path, record: dict) -> None:
    """Append one step's record to a JSONL log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def restart_log(path: Path, step: int) -> None:
    """Prepare the log of a run starting at ``step``: a fresh run (step 0) removes the old log, a
    resumed one drops the records after ``step`` (it logs those steps again)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
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
