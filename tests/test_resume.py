"""A killed calibration resumes from its last checkpoint with the same loss trajectory."""

from __future__ import annotations

import json
import shutil

import pytest

import slaconv.calibrate as cal
from helpers import run, write_recipe
from slaconv.calibrate import checkpoints
from slaconv.workdir import WorkDir


class Killed(BaseException):
    """Stands in for SIGKILL: escapes every ``except Exception``."""


def _kill_after_checkpoint(work, stage, kill_step, monkeypatch):
    """Run ``stage`` on ``work`` in-process and kill it right after it saved checkpoint ``kill_step``."""
    real_save = checkpoints.save_checkpoint

    def save_then_die(root, step, state, limit):
        path = real_save(root, step, state, limit)
        if step == kill_step:
            raise Killed()
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        cal.calibrate(work, _recipe(work), stage=str(stage), show_progress=False)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)


def _losses(work, stage):
    key = "loss_rel_mse_mean" if stage == 1 else "loss"
    return [json.loads(line)[key] for line in (work / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_wan_dir, monkeypatch, stage):
    recipe = write_recipe(tmp_path / "r.yaml", **{f"calibration.stage{stage}.steps": 5,
                                                  "calibration.checkpoint_every": 2})
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    run("convert", tiny_wan_dir, "-o", fresh, "--recipe", recipe)
    shutil.copytree(fresh, killed)
    run("calibrate", fresh, "--stage", stage)

    _kill_after_checkpoint(killed, stage, 4, monkeypatch)
    cfg = json.loads((killed / "sla2_config.json").read_text())
    assert not (cfg["calibration"] or {}).get(f"stage{stage}"), "a killed stage must not look finished"

    run("calibrate", killed, "--stage", stage, "--resume", "latest")
    assert _losses(killed, stage) == _losses(fresh, stage)
    assert (killed / "sla2.safetensors").read_bytes() == (fresh / "sla2.safetensors").read_bytes()


def test_checkpoints_are_pruned_to_the_limit(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage1.steps": 7, "calibration.checkpoint_every": 1,
                                                  "calibration.checkpoints_total_limit": 2})
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    run("calibrate", work, "--stage", "1")
    names = sorted(p.name for p in (work / "checkpoints" / "stage1").iterdir())
    assert names == ["checkpoint-5", "checkpoint-6"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "ck"
    cal.save_checkpoint(root, 2, {"x": 1}, 5)
    (root / "checkpoint-3").mkdir()  # a kill mid-save: no COMPLETE marker
    assert [s for s, _ in cal.list_checkpoints(root)] == [2]


def _recipe(work):
    from slaconv.recipe import load_recipe

    return load_recipe(work / "recipe.yaml")


def test_precomputed_teacher_targets_equal_the_online_teacher(tmp_path, tiny_wan_dir, monkeypatch):
    """calibration.stage2.teacher: precompute computes each checkpoint interval's distillation targets
    (and the held-out ones) with a freshly loaded teacher that is freed before training: the loss curve,
    held-out losses and saved weights are exactly those of the online teacher, the teacher is loaded once
    per interval (its content hash checked on the first load only), and a resumed run picks it up mid-way."""
    common = {"calibration.stage2.steps": 5, "calibration.checkpoint_every": 2, "calibration.stage2.grad_accum": 2}
    online_recipe = write_recipe(tmp_path / "on.yaml", **common)
    pre_recipe = write_recipe(tmp_path / "pre.yaml", **common, **{"calibration.stage2.teacher": "precompute"})
    online, pre, resumed = tmp_path / "online", tmp_path / "pre", tmp_path / "resumed"
    run("convert", tiny_wan_dir, "-o", online, "--recipe", online_recipe)
    run("convert", tiny_wan_dir, "-o", pre, "--recipe", pre_recipe)
    shutil.copytree(pre, resumed)

    loads = []
    real_load = WorkDir.load_base_model

    def counting_load(*args, **kwargs):
        loads.append(kwargs.get("verify", True))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(WorkDir, "load_base_model", counting_load)
    a = json.loads(run("calibrate", online, "--stage", "2", "--json").stdout)["stage2"]
    assert loads == [True]
    loads.clear()
    b = json.loads(run("calibrate", pre, "--stage", "2", "--json").stdout)["stage2"]
    assert loads == [True, False, False]  # steps 0-1, 2-3, 4: one load per checkpoint interval
    assert b["teacher"] == "precompute" and a["teacher"] == "online"
    assert _losses(pre, 2) == _losses(online, 2)
    assert (b["heldout_loss_before"], b["heldout_loss_after"]) == (a["heldout_loss_before"], a["heldout_loss_after"])
    name = "diffusion_pytorch_model.safetensors"
    assert (pre / name).read_bytes() == (online / name).read_bytes()

    _kill_after_checkpoint(resumed, 2, 2, monkeypatch)
    run("calibrate", resumed, "--stage", "2", "--resume", "latest")
    assert _losses(resumed, 2) == _losses(online, 2)
