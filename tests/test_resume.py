"""A killed calibration resumes from its last checkpoint with the same loss trajectory."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli import run, write_recipe

import slaconv.calibrate as cal


class Killed(BaseException):
    """Stands in for SIGKILL: escapes every ``except Exception``."""


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

    real_save = cal.save_checkpoint

    def save_then_die(root, step, state, limit):
        path = real_save(root, step, state, limit)
        if step == 4:
            raise Killed()
        return path

    monkeypatch.setattr(cal, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        cal.calibrate(killed, _recipe(killed), stage=str(stage), show_progress=False)
    monkeypatch.setattr(cal, "save_checkpoint", real_save)
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
