"""Every CLI verb end to end on tiny Wan models, at sequence lengths on and off the block sizes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import dir_snapshot, make_wan, run, write_recipe
from slaconv.cli import main


@pytest.mark.parametrize("frames,height,width,bq,bk", [
    (2, 16, 16, 64, 64),    # 128 tokens: exact blocks
    (2, 18, 22, 64, 64),    # 198 tokens: ragged last block
    (3, 14, 18, 128, 64),   # 189 tokens: ragged, b_q != b_k
])
def test_full_chain(tmp_path, tiny_wan_dir, frames, height, width, bq, bk):
    before = dir_snapshot(tiny_wan_dir)
    recipe = write_recipe(tmp_path / "r.yaml", **{"data.frames": frames, "data.height": height, "data.width": width,
                                                 "sla2.block_q": bq, "sla2.block_k": bk})
    work, data = tmp_path / "work", tmp_path / "data"
    out = json.loads(run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--topk", 0.5, "--json").stdout)
    assert out["layers"] == ["blocks.0.attn1", "blocks.1.attn1"]
    saved = yaml.safe_load((work / "recipe.yaml").read_text())
    assert saved["sla2"]["topk"] == 0.5 and saved["sla2"]["block_q"] == bq  # flag overrides recipe, saved resolved

    run("synth-data", data, "--model", work, "--num-samples", 3)
    cal = json.loads(run("calibrate", work, "--data", data, "--json").stdout)
    assert cal["stage1"]["steps"] == 3 and cal["stage2"]["steps"] == 3
    assert len((work / "logs" / "stage1.jsonl").read_text().splitlines()) == 3

    report = json.loads(run("validate", work, "--data", data, "--json").stdout)
    assert report["passed"] is True
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert 0 < layer["sparsity"] < 1 and 0 <= layer["attention_rel_l2"] < 1 and len(layer["alpha"]) == 2
    for name in ("validation.json", "validation.md", "layer_error.png", "router_mask.png"):
        assert (work / "reports" / name).is_file()
    assert (work / "reports" / "router_mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    info = json.loads(run("inspect", work, "--json").stdout)
    assert [x["layer"] for x in info["layers"]] == out["layers"]
    assert info["validation"]["passed"] is True
    assert "stage1" in info["calibration"] and "stage2" in info["calibration"]
    assert any(x["router_moved"] > 0 for x in info["layers"])  # stage 1 trained the router

    dry = json.loads(run("push", work, "--repo-id", "me/tiny", "--dry-run", "--json").stdout)
    assert "sla2.safetensors" in dry["files"] and not any(f.startswith("checkpoints") for f in dry["files"])
    assert dir_snapshot(tiny_wan_dir) == before  # the source checkpoint is never modified


def test_convert_dry_run_writes_nothing(tmp_path, tiny_wan_dir):
    res = run("convert", tiny_wan_dir, "-o", tmp_path / "w", "--dry-run", "--json")
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and plan["family"] == "wan" and plan["num_layers"] == 2
    assert not (tmp_path / "w").exists()


def test_stages_separately_and_resume_latest(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml")
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    run("calibrate", work, "--stage", "1", "--steps", 2)
    cfg = json.loads((work / "sla2_config.json").read_text())
    assert cfg["calibration"]["stage1"]["steps"] == 2 and "stage2" not in cfg["calibration"]
    run("calibrate", work, "--stage", "2", "--steps", 2, "--resume", "latest")
    cfg = json.loads((work / "sla2_config.json").read_text())
    assert cfg["calibration"]["stage2"]["steps"] == 2


def test_human_output_and_help(tmp_path, tiny_wan_dir):
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "Exit codes" in res.output and "quality gate" in res.output
    work = tmp_path / "w"
    out = run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml")).stdout
    assert "converted 2 layers" in out


def test_validate_gate_failure_exits_4_after_writing_reports(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml", **{"validation.gates": {"attention_rel_l2_max": 1e-9,
                                                                        "velocity_rel_l2_max": 1.0,
                                                                        "sample_psnr_min_db": 0.0}})
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--topk", 0.3)
    res = run("validate", work, code=4)
    assert "quality gate failed" in res.stderr and "attention_rel_l2_max" in res.stderr
    assert res.stdout.startswith("validation FAILED (attention_rel_l2_max)")
    assert str(work / "reports" / "validation.md") in res.stdout
    assert json.loads((work / "reports" / "validation.json").read_text())["passed"] is False
    res = run("push", work, "--repo-id", "me/m", "--dry-run", code=4)
    assert "--allow-failed-validation" in res.stderr
    run("push", work, "--repo-id", "me/m", "--dry-run", "--allow-failed-validation")


def test_validate_and_inspect_print_readable_text(tmp_path, tiny_wan_dir):
    """The terminal gets aligned tables, 4 significant digits and the report paths, not markdown or JSON."""
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml"))
    run("calibrate", work, "--stage", "1", "--steps", 2)
    out = run("validate", work).stdout
    assert out.startswith("validation PASSED") or out.startswith("validation FAILED")
    assert "![" not in out and "|" not in out and "#" not in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert "this model" in header and "convert only" in header and header.rstrip().endswith("gate")
    row = next(line for line in lines if line.startswith("sample PSNR (dB)"))
    assert len(row) <= len(header)  # cells line up under the header
    written = lines[lines.index("reports written:") + 1:]
    for name in ("validation.json", "validation.md", "layer_error.png", "router_mask.png"):
        assert f"  {work / 'reports' / name}" in written

    text = run("inspect", work).stdout
    assert "{" not in text  # no JSON in the human output
    lines = text.splitlines()
    assert "calibration:" in lines and "  stage1:" in lines
    header = next(line for line in lines if line.split() == ["field", "value", "unit"])
    stage1 = json.loads((work / "sla2_config.json").read_text())["calibration"]["stage1"]
    value = stage1["heldout_attention_rel_mse_before"]
    row = next(line for line in lines if line.strip().startswith("heldout_attention_rel_mse_before"))
    assert row.split()[1] == f"{value:.4g}" and len(row.rstrip()) <= len(header)
    seconds = next(line for line in lines if line.strip().startswith("seconds"))
    assert seconds.split()[-1] == "s"


def test_overwrite_requires_flag(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml")
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    res = run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, code=7)
    assert "--overwrite" in res.stderr
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--overwrite")


def test_pipeline_folder_with_subfolder(tmp_path):
    root = tmp_path / "pipe"
    make_wan().save_pretrained(root / "transformer")
    res = run("convert", root, "-o", tmp_path / "w", code=3)
    assert "--subfolder transformer" in res.stderr
    run("convert", root, "--subfolder", "transformer", "-o", tmp_path / "w",
        "--recipe", write_recipe(tmp_path / "r.yaml"))


def test_chain_in_bfloat16(tmp_path, tiny_wan_dir):
    """Real recipes run the model in bf16 (some diffusers modules stay fp32): inputs must follow."""
    recipe = write_recipe(tmp_path / "r.yaml", **{"model.dtype": "bfloat16"})
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    out = json.loads(run("calibrate", work, "--json").stdout)
    assert out["stage2"]["heldout_loss_after"] is not None
    report = json.loads(run("validate", work, "--json").stdout)
    assert report["summary"]["attention_cosine_mean"] > 0.9
    from safetensors import safe_open

    with safe_open(str(work / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attn1.to_q.weight").dtype == torch.bfloat16


def test_convert_reports_the_attention_mass_its_router_keeps(tmp_path, tiny_wan_dir):
    """With alpha_init: calibrate, convert reports (text and JSON) and records the full-attention mass the
    initial router's blocks hold; alpha per head is that mass, clamped to [0.02, 0.98]. More blocks keep more."""
    recipe = write_recipe(tmp_path / "r.yaml", **{"sla2.alpha_init": "calibrate"})
    masses = {}
    for topk in (0.25, 0.75):
        work = tmp_path / f"work{topk}"
        res = CliRunner().invoke(main, ["convert", str(tiny_wan_dir), "-o", str(work), "--recipe", str(recipe),
                                        "--topk", str(topk)])
        assert res.exit_code == 0, res.output
        assert "of the full attention mass (lowest layer blocks." in res.stdout
        out = json.loads(run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--topk", topk, "--overwrite",
                             "--json").stdout)
        mass = out["selected_mass"]
        assert 0 < mass["mean"] < 1 and mass["lowest_layer_mean"] <= mass["mean"]
        for name, heads in mass["per_head"].items():
            assert out["alpha"][name] == pytest.approx([min(max(m, 0.02), 0.98) for m in heads], abs=1e-3)
        saved = json.loads((work / "sla2_config.json").read_text())
        assert saved["alpha_init"]["selected_mass"] == mass
        info = json.loads(run("inspect", work, "--json").stdout)
        for layer in info["layers"]:
            heads = mass["per_head"][layer["layer"]]
            assert layer["initial_mass"] == pytest.approx(sum(heads) / len(heads), abs=1e-4)
        assert "init mass" in run("inspect", work).stdout
        masses[topk] = mass["mean"]
    assert masses[0.25] < masses[0.75]


def test_progress_lines_without_a_terminal_and_quiet(tmp_path, tiny_wan_dir):
    """Not on a terminal, a run logs what it does and one line per finished stage; -q logs nothing."""
    recipe = write_recipe(tmp_path / "r.yaml")
    work = tmp_path / "w"
    res = CliRunner().invoke(main, ["convert", str(tiny_wan_dir), "-o", str(work), "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "SLA2 installed on 2 layers" in res.stderr and f"wrote {work}" in res.stderr
    res = CliRunner().invoke(main, ["calibrate", str(work), "--stage", "1", "--steps", "3"])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert "stage 1: 3 steps on cpu" in lines
    assert any(line.startswith("stage 1: 3/3 (rel_mse=") and line.endswith(" s") for line in lines), lines
    res = CliRunner().invoke(main, ["-q", "calibrate", str(work), "--stage", "1", "--steps", "3"])
    assert res.exit_code == 0 and res.stderr == ""


def test_every_option_says_what_it_does():
    import click

    undocumented = [f"{name} {p.opts[0]}" for name, cmd in [("slaconv", main), *main.commands.items()]
                    for p in cmd.params if isinstance(p, click.Option) and not p.help]
    assert undocumented == []
