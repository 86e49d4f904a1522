"""Calibration runs: every run has an identity, so runs never mix; a resume continues exactly the run it names,
skipping a stage that run completed; Ctrl-C says how to resume; and a run that leaves the model worse than it
started never replaces the weights it started from."""

from __future__ import annotations

import json
import shlex
import shutil

from click.testing import CliRunner

from helpers import dir_snapshot, fails, kill_after_checkpoint, run, write_recipe
from slaconv.calibrate import checkpoints
from slaconv.cli import main

STAGE1 = {"calibration.stage1.steps": 6, "calibration.checkpoint_every": 2, "calibration.eval_samples": 1}


def _converted(tmp_path, tiny_wan_dir, name="w", **overrides):
    work = tmp_path / name
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / f"{name}.yaml", **overrides))
    return work


def _log(work, stage):
    return [json.loads(line) for line in (work / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]


def _losses(work, stage):
    key = "loss_rel_mse_mean" if stage == 1 else "loss"
    return [r[key] for r in _log(work, stage)]


def _summary(work, stage):
    return json.loads((work / "sla2_config.json").read_text())["calibration"][f"stage{stage}"]


def _same_files(a, b, *names):
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def test_a_new_run_never_continues_a_finished_runs_checkpoints(tmp_path, tiny_wan_dir, monkeypatch):
    """Run A completes and leaves checkpoints; run B (other settings) in the same dir is killed and resumed:
    it continues from its own checkpoint, logs its own steps only, and saves what an uninterrupted B saves."""
    work = _converted(tmp_path, tiny_wan_dir, **STAGE1)
    run("calibrate", work, "--stage", "1")
    reference = tmp_path / "reference"
    shutil.copytree(work, reference)
    kill_after_checkpoint(monkeypatch, 2, work, "--stage", "1", "--lr", "1e-3")
    run("calibrate", work, "--stage", "1", "--lr", "1e-3", "--resume", "latest")
    run("calibrate", reference, "--stage", "1", "--lr", "1e-3")
    assert [r["step"] for r in _log(work, 1)] == [1, 2, 3, 4, 5, 6]
    assert _losses(work, 1) == _losses(reference, 1)
    assert _same_files(work, reference, "sla2.safetensors")
    assert _summary(work, 1)["lr"] == 1e-3


def test_runs_and_checkpoints_of_another_run_are_refused(tmp_path, tiny_wan_dir, monkeypatch):
    work = _converted(tmp_path, tiny_wan_dir, **STAGE1)
    clean = tmp_path / "clean"
    shutil.copytree(work, clean)
    kill_after_checkpoint(monkeypatch, 4, work, "--stage", "1")
    kept = dir_snapshot(work)
    # the same settings: the unfinished run can be continued, or discarded
    line = fails(7, "calibrate", work, "--stage", "1", match="--resume latest")
    assert "unfinished" in line and "--overwrite" in line
    # other settings: another run's checkpoints are neither continued nor silently mixed in
    line = fails(7, "calibrate", work, "--stage", "1", "--lr", "1e-3", match="another run")
    assert "--overwrite" in line
    fails(3, "calibrate", work, "--stage", "1", "--lr", "1e-3", "--resume", "latest", match="another run")
    # a checkpoint of another work dir's run (it started from other weights) is refused too
    other = tmp_path / "other"
    shutil.copytree(clean, other)
    run("calibrate", other, "--stage", "1")
    kill_after_checkpoint(monkeypatch, 2, other, "--stage", "1", "--overwrite")
    foreign = other / "checkpoints" / "stage1" / "checkpoint-2"
    fails(3, "calibrate", work, "--stage", "1", "--resume", foreign, match="another run")
    assert dir_snapshot(work) == kept
    # --overwrite discards the unfinished run and starts afresh: exactly a clean run
    run("calibrate", work, "--stage", "1", "--lr", "1e-3", "--overwrite")
    run("calibrate", clean, "--stage", "1", "--lr", "1e-3")
    assert [r["step"] for r in _log(work, 1)] == [1, 2, 3, 4, 5, 6]
    assert _losses(work, 1) == _losses(clean, 1)
    assert _same_files(work, clean, "sla2.safetensors")


def test_a_checkpoint_of_the_same_run_resumes_in_another_work_dir(tmp_path, tiny_wan_dir, monkeypatch):
    """Two copies of one converted dir start the same run: the second resumes from the first's checkpoint
    (copied in, with the run's log records) and ends where an uninterrupted run ends."""
    work = _converted(tmp_path, tiny_wan_dir, **STAGE1)
    copy, fresh = tmp_path / "copy", tmp_path / "fresh"
    shutil.copytree(work, copy)
    shutil.copytree(work, fresh)
    kill_after_checkpoint(monkeypatch, 4, work, "--stage", "1")
    run("calibrate", copy, "--stage", "1", "--resume", work / "checkpoints" / "stage1" / "checkpoint-4")
    run("calibrate", fresh, "--stage", "1")
    assert [r["step"] for r in _log(copy, 1)] == [1, 2, 3, 4, 5, 6]
    assert _losses(copy, 1) == _losses(fresh, 1)
    assert _same_files(copy, fresh, "sla2.safetensors")
    assert _summary(copy, 1)["run_id"] == _summary(fresh, 1)["run_id"]


def test_resume_skips_the_stage_the_run_completed(tmp_path, tiny_wan_dir, monkeypatch):
    work = _converted(tmp_path, tiny_wan_dir, **{"calibration.stage1.steps": 4, "calibration.stage2.steps": 4,
                                                 "calibration.checkpoint_every": 2, "calibration.eval_samples": 1})
    fresh = tmp_path / "fresh"
    shutil.copytree(work, fresh)
    run("calibrate", fresh)
    kill_after_checkpoint(monkeypatch, 2, work, stage=2)
    stage1_log = (work / "logs" / "stage1.jsonl").read_bytes()
    stage1_summary = _summary(work, 1)
    out = json.loads(run("calibrate", work, "--resume", "latest", "--json").stdout)
    assert out["skipped_stages"] == ["1"]
    assert (work / "logs" / "stage1.jsonl").read_bytes() == stage1_log  # stage 1 did not run again
    assert _summary(work, 1) == stage1_summary
    assert _losses(work, 2) == _losses(fresh, 2)
    assert _same_files(work, fresh, "sla2.safetensors", "diffusion_pytorch_model.safetensors")


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_wan_dir, monkeypatch):
    work = _converted(tmp_path, tiny_wan_dir, **STAGE1)
    fresh = tmp_path / "fresh"
    shutil.copytree(work, fresh)
    real_save = checkpoints.save_checkpoint

    def save_then_interrupt(root, step, *rest, **kwargs):
        path = real_save(root, step, *rest, **kwargs)
        if step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_interrupt)
    res = CliRunner().invoke(main, ["-q", "calibrate", str(work), "--stage", "1", "--seed", "3"])
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert res.exit_code == 130, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), res.stderr
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:2] == ["slaconv", "calibrate"] and command[-2:] == ["--resume", "latest"]
    run(*command[1:])
    run("calibrate", fresh, "--stage", "1", "--seed", "3")
    assert _losses(work, 1) == _losses(fresh, 1)
    assert _same_files(work, fresh, "sla2.safetensors")
