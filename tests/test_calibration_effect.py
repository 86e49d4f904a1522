"""Calibration must actually help: held-out errors fall across both stages on a tiny Wan model."""

from __future__ import annotations

import json

from test_cli import run, write_recipe


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
