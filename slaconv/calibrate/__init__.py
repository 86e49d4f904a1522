"""``slaconv calibrate``: stage 1 (router + alpha) then stage 2 (end-to-end QAT fine-tune).

Stage 1 (:mod:`.stage1`) trains each layer's router and alpha against full attention, one layer at
a time as the frozen model's forward reaches it.  Stage 2 (:mod:`.stage2`) fine-tunes every model
weight and alpha with the router frozen and the sparse branch in the recipe's low-bit mode, against
the dense teacher's velocity or the flow-matching target.

Every step's randomness is a function of (seed, step) (:mod:`.sampler`), so a resumed run replays
exactly the batches, noise and timesteps of an uninterrupted one.  Each stage's run has an identity
(:mod:`.runs`): runs never mix their checkpoints or logs, and each keeps the best state it reached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import OutOfMemoryError
from ..recipe import Recipe
from ..workdir import WorkDir
from . import checkpoints
from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .distributed import full_model_state, full_training_state, load_training_state
from .heldout import heldout_attention_error, heldout_loss
from .results import save_results
from .sampler import StepSampler
from .stage1 import run_stage1
from .stage2 import run_stage2
from .teacher import TeacherTargets, stage2_target

__all__ = [
    "StepSampler", "TeacherTargets", "calibrate", "full_model_state", "full_training_state",
    "heldout_attention_error", "heldout_loss", "list_checkpoints", "load_checkpoint", "load_training_state",
    "loss_curve", "run_stage1", "run_stage2", "save_checkpoint", "save_results", "stage2_target",
]

logger = logging.getLogger(__name__)


def _oom(stage: str) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"out of memory in stage {stage}: lower calibration."
        f"{'stage1.query_blocks_per_step' if stage == '1' else 'stage2.batch_size'}"
        ", enable calibration.stage2.gradient_checkpointing, or use a smaller data resolution"
    )


def calibrate(workdir: Path, recipe: Recipe, *, stage: str = "all", data_dir=None, resume=None, device="cpu",
              show_progress=True, overwrite=False) -> dict:
    """Run stage 1, stage 2 or both on a work dir written by ``convert``; returns their summaries.

    ``resume``: ``latest`` continues this run where its checkpoints left it and skips a stage it completed;
    a checkpoint folder resumes its own stage there (the other stage, with ``all``, as with ``latest``).
    ``overwrite`` discards another run's unfinished checkpoints instead of refusing to start
    (:func:`.runs.plan_run`).  ``skipped_stages`` lists the stages a resume found completed."""
    workdir = Path(workdir)
    WorkDir(workdir).read_sla2_config()
    out = {"work_dir": str(workdir), "recipe_hash": recipe.hash(), "skipped_stages": []}
    resumed_stage = None
    if resume not in (None, "latest"):
        checkpoints.find_checkpoint(WorkDir(workdir).checkpoints_dir(1), resume)  # a complete checkpoint?
        resumed_stage = str(checkpoints.checkpoint_run(Path(resume))["stage"])
    for name, run in (("1", run_stage1), ("2", run_stage2)):
        if stage in (name, "all"):
            stage_resume = resume if resumed_stage in (None, name) else "latest"
            settings = recipe.calibration.stage1 if name == "1" else recipe.calibration.stage2
            logger.info(f"stage {name}: {settings.steps} steps on {device}"
                        + (f", resuming from {stage_resume}" if stage_resume else ""))
            try:
                result = run(workdir, recipe, data_dir=data_dir, resume=stage_resume, device=device,
                             show_progress=show_progress, overwrite=overwrite)
            except torch.OutOfMemoryError:
                raise _oom(name) from None
            if result.pop("skipped", None):
                out["skipped_stages"].append(name)
            out.update(result)
            out.setdefault("loss_curve", {})[f"stage{name}"] = loss_curve(workdir, int(name))
    return out


def loss_curve(workdir: Path, stage: int) -> list[dict]:
    """One record per logged step of a stage: step, loss (stage 1: mean relative attention MSE over
    layers), learning rate (stage 2), wall seconds and, at checkpoints and the last step, the held-out score;
    stage 1's per-layer detail stays in the log."""
    path = WorkDir(workdir).log_path(stage)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k not in ("layers", "run_id")} for r in records]
