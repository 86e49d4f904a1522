"""Calibration must actually help: held-out errors fall across both stages on a tiny Wan model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import fails, run, write_recipe


def test_both_stages_reduce_held_out_error(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml", **{
        "sla2.topk": 0.25, "calibration.stage1.steps": 40, "calibration.stage1.lr": 1.0e-3,
        "calibration.stage1.query_blocks_per_step": 4, "calibration.stage2.steps": 30,
        "calibration.stage2.lr": 1.0e-5, "calibration.eval_samples": 3, "calibration.checkpoint_every": 1000,
        "data.frames": 2, "data.height": 32, "data.width": 32})  # 512 tokens = 8 blocks of 64
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    out = json.loads(run("calibrate", work, "--json").stdout)
    s1, s2 = out["stage1"], out["stage2"]
    assert s1["heldout_attention_rel_mse_after"] < 0.9 * s1["heldout_attention_rel_mse_before"], s1
    assert s2["heldout_loss_after"] < s2["heldout_loss_before"], s2


def _sla2(work):
    return load_file(str(work / "sla2.safetensors"))


def _weights(work):
    return {k: v for f in sorted(work.glob("diffusion_pytorch_model*.safetensors"))
            for k, v in load_file(str(f)).items()}


def test_frozen_parts_stay_bitwise_unchanged(tmp_path, tiny_wan_dir):
    """stage1.lr 0 trains alpha only; stage2.train_alpha false trains the weights but keeps every alpha."""
    recipe = write_recipe(tmp_path / "r.yaml", **{
        "sla2.topk": 0.25, "calibration.stage1.steps": 3, "calibration.stage1.lr": 0.0,
        "calibration.stage1.alpha_lr": 5e-2, "calibration.stage1.query_blocks_per_step": 2,
        "calibration.stage2.steps": 3, "calibration.stage2.lr": 1e-4, "calibration.stage2.warmup_steps": 0,
        "calibration.stage2.train_alpha": False, "calibration.eval_samples": 1,
        "calibration.checkpoint_every": 1000, "data.frames": 2, "data.height": 32, "data.width": 32})
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    before = _sla2(work)
    run("calibrate", work, "--stage", "1")
    after1 = _sla2(work)
    routers = [k for k in before if "router" in k]
    alphas = [k for k in before if "alpha" in k]
    assert routers and alphas
    assert all(torch.equal(before[k], after1[k]) for k in routers)
    assert any(not torch.equal(before[k], after1[k]) for k in alphas)
    w1 = _weights(work)
    run("calibrate", work, "--stage", "2")
    after2, w2 = _sla2(work), _weights(work)
    assert all(torch.equal(after1[k], after2[k]) for k in alphas + routers)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("overrides,message", [
    ({"calibration.stage1.lr": 0.0, "calibration.stage1.alpha_lr": 0.0}, "nothing to train"),
    ({"calibration.stage2.train_alpha": "no"}, "train_alpha must be true/false"),
])
def test_frozen_settings_are_checked(tmp_path, tiny_wan_dir, overrides, message):
    recipe = write_recipe(tmp_path / "r.yaml", **overrides)
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "w", "--recipe", recipe, match=message)
