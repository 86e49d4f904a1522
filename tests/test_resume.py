"""A killed calibration resumes from its last checkpoint with the same loss trajectory."""

from __future__ import annotations

import json
import shutil

import pytest

import slaconv.calibrate as cal
from helpers import kill_after_checkpoint, run, write_recipe
from slaconv.calibrate.stage2 import lr_factor
from slaconv.workdir import WorkDir


def _losses(work, stage):
    key = "loss_rel_mse_mean" if stage == 1 else "loss"
    return [json.loads(line)[key] for line in (work / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage,schedule", [(1, None), (2, None), (2, "cosine")])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_wan_dir, monkeypatch, stage, schedule):
    extra = {"calibration.stage2.lr_schedule": schedule, "calibration.stage2.warmup_steps": 1} if schedule else {}
    recipe = write_recipe(tmp_path / "r.yaml", **{f"calibration.stage{stage}.steps": 5,
                                                  "calibration.checkpoint_every": 2, **extra})
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    run("convert", tiny_wan_dir, "-o", fresh, "--recipe", recipe)
    shutil.copytree(fresh, killed)
    run("calibrate", fresh, "--stage", stage)

    kill_after_checkpoint(monkeypatch, 4, killed, "--stage", stage)
    cfg = json.loads((killed / "sla2_config.json").read_text())
    assert not (cfg["calibration"] or {}).get(f"stage{stage}"), "a killed stage must not look finished"

    run("calibrate", killed, "--stage", stage, "--resume", "latest")
    assert _losses(killed, stage) == _losses(fresh, stage)
    if schedule:  # the resumed run continues the schedule where the checkpoint left it
        lrs = [json.loads(line)["lr"] for line in (killed / "logs" / "stage2.jsonl").read_text().splitlines()]
        base = WorkDir(killed).read_recipe().calibration.stage2.lr
        assert lrs == pytest.approx([base * lr_factor(step, warmup=1, steps=5, schedule=schedule)
                                     for step in range(5)], rel=1e-12)
    assert (killed / "sla2.safetensors").read_bytes() == (fresh / "sla2.safetensors").read_bytes()
    # the summary describes the whole run: where it started, and the time of both segments
    a, b = (json.loads((w / "sla2_config.json").read_text())["calibration"][f"stage{stage}"] for w in (fresh, killed))
    before = "heldout_attention_rel_mse_before" if stage == 1 else "heldout_loss_before"
    assert b[before] == a[before] is not None
    step_seconds = sum(json.loads(line)["seconds"] for line in (killed / "logs" / f"stage{stage}.jsonl").open())
    assert b["seconds"] >= step_seconds - 0.01, (b["seconds"], step_seconds)


def test_stage2_learning_rate_schedules():
    """Linear warm-up, then constant or a half cosine that is still above 0 at the last step."""
    constant = [lr_factor(s, warmup=4, steps=20, schedule="constant") for s in range(20)]
    assert constant == [0.25, 0.5, 0.75] + [1.0] * 17
    cosine = [lr_factor(s, warmup=4, steps=20, schedule="cosine") for s in range(20)]
    assert cosine[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(a > b for a, b in zip(cosine[4:], cosine[5:])) and 0 < cosine[-1] < 0.01
    assert cosine[12] == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(0, warmup=0, steps=3, schedule="cosine") == 1.0


def test_checkpoints_are_pruned_to_the_limit(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage1.steps": 7, "calibration.checkpoint_every": 1,
                                                  "calibration.checkpoints_total_limit": 2})
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    run("calibrate", work, "--stage", "1")
    names = sorted(p.name for p in (work / "checkpoints" / "stage1").iterdir())
    # the newest two, and the one with the best held-out score (the state a run may end up keeping)
    records = [json.loads(line) for line in (work / "logs" / "stage1.jsonl").open()]
    scores = {r["step"]: r["heldout"] for r in records if r["step"] < 7}
    assert sorted(scores) == [1, 2, 3, 4, 5, 6]
    best = min(scores, key=lambda step: (scores[step], -step))
    assert names == sorted({f"checkpoint-{step}" for step in (5, 6, best)})


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "stage1"
    cal.save_checkpoint(root, 2, {"x": 1}, 5, "run")
    (root / "checkpoint-3").mkdir()  # a kill mid-save: no COMPLETE marker
    assert [s for s, _ in cal.list_checkpoints(root)] == [2]


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

    kill_after_checkpoint(monkeypatch, 2, resumed, "--stage", 2)
    run("calibrate", resumed, "--stage", "2", "--resume", "latest")
    assert _losses(resumed, 2) == _losses(online, 2)
