"""A calibration run: its identity, where it starts, and which state it keeps.

A run is one stage trained from one starting point with one set of settings.  Its id hashes the settings that
decide the stage's result (the recipe with the per-process batch turned into the global batch, so the process
count does not matter, but without the validation settings or the number of checkpoints kept), the content
of the work dir's weights when the run starts, and the stage.  Checkpoints and log records carry the id, and
the stage's summary in ``sla2_config.json`` names the run that completed it.  So:

* ``--resume`` continues only a checkpoint of the same run; one from another work dir is accepted only when
  that dir started from the same weights with the same settings, which makes it the same run;
* a stage the run already completed is skipped on resume;
* a new run does not start over another run's unfinished checkpoints unless told to discard them.

The held-out score is taken at the start, at every checkpoint and at the end.  The run keeps the best state
it reached, stops when the score runs away from the best so far, and leaves the work dir's weights alone when
even its best state is worse than where it started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DivergedError, InputError, OutputExistsError
from ..recipe import Recipe
from ..source import content_hash
from ..workdir import WorkDir
from . import checkpoints

logger = logging.getLogger(__name__)

METRICS = {1: "attention rel. MSE", 2: "loss"}
"""What each stage's held-out score measures (lower is better)."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_id(recipe: Recipe, stage: int, world: int) -> str:
    """Hash of the settings that decide stage ``stage``'s result when run on ``world`` processes."""
    tree = recipe.to_dict()
    calibration = dict(tree["calibration"])
    own = dict(calibration[f"stage{stage}"])
    own["batch_size"] *= world  # N processes with batch B see the samples of one process with batch N x B
    shift = calibration["stage2"]["timestep_shift"]  # the noise levels of both stages' samples
    for key in ("stage1", "stage2", "checkpoints_total_limit"):
        del calibration[key]
    decisive = {"model": tree["model"], "sla2": tree["sla2"], "data": tree["data"],
                "calibration": {**calibration, f"stage{stage}": own, "timestep_shift": shift}}
    return _digest(json.dumps(decisive, sort_keys=True))


@dataclass
class Progress:
    """What a run has measured so far; every checkpoint holds it, so a resumed run carries on with it."""

    before: float | None = None
    """Held-out score of the state the run started from (None without held-out samples)."""
    best_step: int | None = None
    """Step of the run's best evaluated state, and its score."""
    best_score: float | None = None
    seconds: float = 0.0
    """Training time of the segments before the current one (a resumed run adds its own)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record(self, step: int, score: float, factor: float) -> str | None:
        """Note the held-out ``score`` of the state at ``step``; returns why the run diverged, or None: the
        score is not finite, or above ``factor`` times the best so far (the start included)."""
        if not math.isfinite(score):
            return f"the held-out score became {score} at step {step}"
        reference = min(x for x in (self.before, self.best_score) if x is not None)
        if score > factor * reference:
            return f"the held-out score rose to {score:.4g} at step {step}, over {factor:g}x the best {reference:.4g}"
        if self.best_score is None or score <= self.best_score:  # a tie: the later state
            self.best_step, self.best_score = step, score
        return None

    def score_of(self, step: int) -> float | None:
        """The held-out score of the state a run kept at ``step`` (0: its start)."""
        return self.before if step == 0 else self.best_score if step == self.best_step else None

    def kept_step(self, stage: int, last_step: int, tolerance: float, diverged: str | None) -> int:
        """The step whose state the run keeps: its best evaluated one (its last one without held-out samples).
        :class:`DivergedError` when that state is more than ``tolerance`` (relative) worse than the start, or
        the run diverged with nothing evaluated to fall back on."""
        fix = (f"the work dir keeps its weights from before stage {stage}; start again with a lower learning rate "
               "(--lr) and --overwrite to discard this run's checkpoints")
        if last_step == 0 and not diverged:  # a stage of 0 steps keeps its start
            return 0
        if self.before is None:
            if diverged:
                raise DivergedError(f"stage {stage} diverged: {diverged}, and without held-out samples "
                                    f"(calibration.eval_samples) there is no better state to keep; {fix}")
            return last_step
        if self.best_score is None or self.best_score > self.before * (1 + tolerance):
            best = "" if self.best_score is None else f", its best {self.best_score:.4g} at step {self.best_step}"
            why = f"; {diverged}" if diverged else ""
            raise DivergedError(f"stage {stage} left the model worse than it started (held-out {METRICS[stage]} "
                                f"{self.before:.4g} before{best}{why}); {fix}")
        if diverged:
            logger.warning(f"stage {stage} diverged ({diverged}): stopped, and kept the state of step "
                           f"{self.best_step} (held-out {METRICS[stage]} {self.best_score:.4g})")
        return self.best_step


@dataclass
class RunStart:
    """Where a stage's run starts: from scratch, from its own checkpoint, or nowhere (completed)."""

    stage: int
    run_id: str
    settings_id: str
    step: int = 0
    state: dict | None = None
    """The checkpoint's training state when the run resumes."""
    completed: dict | None = None
    """The stage's summary when this run already completed it (the stage is skipped)."""
    progress: Progress = field(default_factory=Progress)
    checkpoint_root: Path | None = None
    clear: bool = False
    """Whether the stage's checkpoints (of a finished run, or discarded) go before the run starts."""
    adopt: tuple[Path, set] | None = None
    """The checkpoint folder resumed from another work dir, and the steps of it to copy in."""

    def checkpoint_meta(self, seconds: float) -> dict:
        """The run's part of a checkpoint's state, ``seconds`` being this segment's training time so far."""
        return {**self.progress.to_dict(), "seconds": self.progress.seconds + seconds}

    def end_step(self, record: dict, calibration, last_step: int, evaluate, log_path: Path, is_main: bool) -> str | None:
        """Finish the step of ``record``: at a checkpoint or the last step, score the held-out samples
        (``evaluate()``, every process) and note the score; log the record (main process).  Returns why the
        run diverged, or None."""
        step, diverged = record["step"], None
        if calibration.eval_samples and (step % calibration.checkpoint_every == 0 or step == last_step):
            record["heldout"] = evaluate()
            diverged = self.progress.record(step, record["heldout"], calibration.divergence_factor)
        if is_main:
            checkpoints.append_log(log_path, {**record, "run_id": self.run_id})
        return diverged

    def summary(self, kept_step: int, seconds: float) -> dict:
        """The run's part of the stage summary."""
        return {"run_id": self.run_id, "settings_id": self.settings_id, "kept_step": kept_step,
                "seconds": round(self.progress.seconds + seconds, 2)}

    def kept_state(self, step: int) -> dict:
        """The training state of the checkpoint at ``step`` (the run's best, which pruning keeps)."""
        return checkpoints.read_checkpoint(self.checkpoint_root / f"checkpoint-{step}")


def begin_run(work: WorkDir, recipe: Recipe, stage: int, accelerator, *, resume: str | None,
              overwrite: bool) -> RunStart:
    """:func:`plan_run` on every process of the launch (only reading the work dir, so that all decide alike),
    then, for a run that starts, :func:`prepare_run` on the main process while the others wait."""
    weights = [content_hash(work.path) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:  # one process reads the weights, not every one
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(weights)
    start = plan_run(work, recipe, stage, weights[0], world=accelerator.num_processes, resume=resume,
                     overwrite=overwrite)
    if start.completed is None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            prepare_run(work, recipe, start)
        accelerator.wait_for_everyone()
    return start


def plan_run(work: WorkDir, recipe: Recipe, stage: int, weights: str, *, world: int, resume: str | None,
             overwrite: bool) -> RunStart:
    """Decide where stage ``stage``'s run starts, ``weights`` being the content hash of the work dir's weights;
    reads the work dir only (:func:`prepare_run` does what the decision needs).

    ``resume``: None (a new run), ``latest`` or a checkpoint folder.  Refuses with one line: a new run over
    another run's unfinished checkpoints (:class:`OutputExistsError`; ``overwrite`` discards them), and a
    resume from another run's checkpoint (:class:`InputError`)."""
    sid = settings_id(recipe, stage, world)
    start = RunStart(stage, _digest(f"{sid}:{weights}:{stage}"), sid)
    root = start.checkpoint_root = work.checkpoints_dir(stage)
    done = (work.read_sla2_config().calibration or {}).get(f"stage{stage}") or {}
    own = checkpoints.find_checkpoint(root, "latest")
    own_run = checkpoints.checkpoint_run(own[1])["run_id"] if own else None
    # checkpoints written before runs had ids count as finished when the stage's summary is that old too
    own_finished = own is not None and own_run == done.get("run_id") and (own_run is not None or bool(done))

    if resume not in (None, "latest"):
        step, path = checkpoints.find_checkpoint(root, resume)
        if checkpoints.checkpoint_run(path)["run_id"] != start.run_id:
            raise InputError(f"checkpoint {path} belongs to another run (it started from other weights or with other "
                             "settings than this one); resume it where it ran, or start this run without --resume")
        state = checkpoints.read_checkpoint(path)
        if path.parent.resolve() != root.resolve():
            if own and own_run != start.run_id:
                _check_clear(work, stage, own, own_finished, overwrite, start.run_id)
                start.clear = True
            start.adopt = (path, {step, state["run"]["best_step"]})
        return _resumed(start, step, state)
    if resume and own and own_run == start.run_id:
        return _resumed(start, own[0], checkpoints.read_checkpoint(own[1]))
    if resume and done.get("settings_id") == sid and (own is None or own_finished):
        logger.info(f"stage {stage}: already completed by this run, skipped")
        start.completed = done
        return start
    if own and not own_finished and resume:
        raise InputError(f"{work}: its stage-{stage} checkpoints belong to another run (other settings or starting "
                         "weights than this one); continue that run with its own settings, or start this one "
                         "without --resume and with --overwrite to discard them")
    _check_clear(work, stage, own, own_finished, overwrite, start.run_id)
    start.clear = True
    return start


def prepare_run(work: WorkDir, recipe: Recipe, start: RunStart) -> None:
    """Prepare the work dir for the run :func:`plan_run` decided on: remove the checkpoints it replaces, copy
    in those it resumes from another work dir, trim the log to its start and save its recipe."""
    log_path = work.log_path(start.stage)
    if start.clear:
        shutil.rmtree(start.checkpoint_root, ignore_errors=True)
    if start.adopt is not None:
        _adopt(*start.adopt, start.checkpoint_root, log_path, start.run_id)
    checkpoints.restart_log(log_path, start.step, start.run_id)
    work.write_recipe(recipe)


def _check_clear(work: WorkDir, stage: int, own, own_finished: bool, overwrite: bool, run_id: str) -> None:
    """May a run start over the stage's checkpoints?  Those of a completed run go silently, those of an
    unfinished one only with ``overwrite``."""
    if own and not own_finished and not overwrite:
        step, path = own
        if checkpoints.checkpoint_run(path)["run_id"] == run_id:
            raise OutputExistsError(f"{work} holds an unfinished stage-{stage} run (checkpoint-{step}); continue it "
                                    "with --resume latest, or pass --overwrite to discard it and start again")
        raise OutputExistsError(f"{work} holds the checkpoints of another run of stage {stage}, unfinished (other "
                                "settings or starting weights); pass --overwrite to discard them, or continue that "
                                "run with its own settings and --resume latest")


def _adopt(path: Path, steps: set, root: Path, log_path: Path, run_id: str) -> None:
    """Copy checkpoints ``steps`` of this run from another work dir (the one resumed, and the run's best, which
    it may end up keeping) into this one's, and the run's log records from there."""
    for step in steps:
        source = path.parent / f"checkpoint-{step}"
        if step and (source / "COMPLETE").is_file() and not (root / source.name).exists():
            shutil.copytree(source, root / source.name)
    other_log = path.parent.parent.parent / WorkDir.LOGS / log_path.name  # <work>/checkpoints/stage<n>/<checkpoint>
    if other_log.is_file() and other_log.resolve() != log_path.resolve():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(line + "\n" for line in other_log.read_text().splitlines()
                                    if line and json.loads(line).get("run_id") == run_id))


def _resumed(start: RunStart, step: int, state: dict) -> RunStart:
    start.step, start.state, start.progress = step, state, Progress(**state["run"])
    return start
