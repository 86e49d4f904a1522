"""Faults while calibrating: a checkpoint write that dies midway, a corrupt checkpoint, a full disk."""

from __future__ import annotations

import errno
import json

import pytest
from click.testing import CliRunner

import slaconv.calibrate as cal
from helpers import Killed, fails, run, write_recipe
from slaconv.calibrate import checkpoints
from slaconv.cli import main
from slaconv.errors import EXIT_DISK_FULL, EXIT_INPUT

STEPS = {"calibration.stage1.steps": 4, "calibration.checkpoint_every": 1}


@pytest.fixture
def work(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml", **STEPS))
    return work


def _failing_save(monkeypatch, at_step: int, exc: BaseException):
    """``save_state`` that writes step ``at_step``'s files halfway (a truncated safetensors), then raises."""
    real = checkpoints.save_state

    def save(folder, state):
        if folder.name.startswith(f".checkpoint-{at_step}."):
            real(folder, state)
            blob = folder / "state.safetensors"
            blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
            raise exc
        real(folder, state)

    monkeypatch.setattr(checkpoints, "save_state", save)


def _steps(work):
    return [step for step, _ in cal.list_checkpoints(work / "checkpoints" / "stage1")]


def test_a_checkpoint_write_killed_midway_is_never_resumed(work, monkeypatch):
    _failing_save(monkeypatch, 3, Killed())
    with pytest.raises(Killed):
        CliRunner().invoke(main, ["-q", "calibrate", str(work), "--stage", "1"])
    monkeypatch.undo()
    assert _steps(work) == [1, 2]
    assert not (work / "checkpoints" / "stage1" / "checkpoint-3").exists()
    # a SIGKILL between the last file and the rename leaves a complete-looking temporary folder: not a checkpoint
    leftover = work / "checkpoints" / "stage1" / ".checkpoint-3.tmp-x"
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("3\n")
    assert _steps(work) == [1, 2]
    run("calibrate", work, "--stage", "1", "--resume", "latest")
    log = [json.loads(line)["step"] for line in (work / "logs" / "stage1.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["state.safetensors", "state.json"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(work, monkeypatch, damage):
    _failing_save(monkeypatch, 3, Killed())
    with pytest.raises(Killed):
        CliRunner().invoke(main, ["-q", "calibrate", str(work), "--stage", "1"])
    monkeypatch.undo()
    target = work / "checkpoints" / "stage1" / "checkpoint-2" / damage
    target.write_bytes(target.read_bytes()[:40])
    line = fails(EXIT_INPUT, "calibrate", work, "--stage", "1", "--resume", "latest", match=str(target))
    assert "corrupt" in line and "checkpoint-1" in line  # and which checkpoint still resumes


def test_a_full_disk_says_so_and_what_was_kept(work, monkeypatch):
    before = (work / "sla2.safetensors").read_bytes()
    _failing_save(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    line = fails(EXIT_DISK_FULL, "calibrate", work, "--stage", "1", match="disk is full")
    assert "checkpoint-3" in line and "checkpoint-2" in line and "--resume latest" in line
    assert _steps(work) == [1, 2]
    assert (work / "sla2.safetensors").read_bytes() == before  # the work dir's weights are untouched


def test_a_full_disk_elsewhere_is_one_line_too(tmp_path, tiny_wan_dir, monkeypatch):
    from slaconv import workdir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "sla2_config.json")

    monkeypatch.setattr(workdir, "write_json", full)
    fails(EXIT_DISK_FULL, "convert", tiny_wan_dir, "-o", tmp_path / "w", match="the disk is full (writing sla2_config")
    assert not (tmp_path / "w").exists()  # the half-made work dir is not left behind
