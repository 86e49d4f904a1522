"""Bad input: one clear line on stderr, a documented exit code, nothing written where it must not be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import slaconv
from helpers import dir_snapshot, fails, make_wan, run, write_recipe
from slaconv.cli import main
from slaconv.config import ConfigError
from slaconv.errors import InputError


def test_missing_local_model(tmp_path):
    fails(3, "convert", tmp_path / "nope", "-o", tmp_path / "w", match="does not exist")
    assert not (tmp_path / "w").exists()


def test_unknown_hub_id_offline(tmp_path):
    fails(3, "--offline", "convert", "no-such-org/no-such-model", "-o", tmp_path / "w", match="not in the Hub cache")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(3, "convert", tmp_path / "empty", "-o", tmp_path / "w", match="no config.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_size": 3}')
    fails(3, "convert", bad, "-o", tmp_path / "w", match="no _class_name")
    (bad / "config.json").write_text("{not json")
    fails(3, "convert", bad, "-o", tmp_path / "w", match="not valid JSON")


def test_unsupported_family(tmp_path):
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel(in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=4, num_layers=1,
                          patch_size=2, sample_size=8, norm_type="ada_norm_zero", num_embeds_ada_norm=8,
                          activation_fn="gelu-approximate", attention_bias=True).save_pretrained(tmp_path / "dit")
    fails(3, "convert", tmp_path / "dit", "-o", tmp_path / "w", match="not a supported DiT family")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_wan_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_wan_dir / "config.json", folder / "config.json")
    torch.save({"w": torch.ones(1)}, folder / "diffusion_pytorch_model.bin")
    fails(3, "convert", folder, "-o", tmp_path / "w", match="no .safetensors")


def test_truncated_weights(tmp_path, tiny_wan_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_wan_dir, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails(3, "convert", folder, "-o", tmp_path / "w", match="not a readable safetensors file")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key,value,match", [
    ("sla2.topk", 0, "sla2.topk"), ("sla2.topk", 1.5, "sla2.topk"), ("sla2.block_q", 96, "block_q"),
    ("sla2.quant", "fp4", "sla2.quant"),
])
def test_recipe_out_of_range(tmp_path, tiny_wan_dir, key, value, match):
    recipe = write_recipe(tmp_path / "r.yaml", **{key: value})
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "w", "--recipe", recipe, match=match)


def test_recipe_unknown_key(tmp_path, tiny_wan_dir):
    (tmp_path / "r.yaml").write_text("sla2:\n  topk: 0.1\n  sparsity_magic: 3\n")
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "w", "--recipe", tmp_path / "r.yaml",
          match="unknown recipe key 'sla2.sparsity_magic'")


def test_output_dir_with_other_content(tmp_path, tiny_wan_dir):
    out = tmp_path / "w"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails(7, "convert", tiny_wan_dir, "-o", out, match="not a slaconv work dir")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def _workdir(tmp_path, tiny_wan_dir, **overrides) -> Path:
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml", **overrides))
    return work


def test_data_with_wrong_shapes_or_dtypes(tmp_path, tiny_wan_dir):
    work = _workdir(tmp_path, tiny_wan_dir)
    data = tmp_path / "data"
    run("synth-data", data, "--model", work, "--num-samples", 2)
    manifest = json.loads((data / "dataset.json").read_text())
    sample = data / manifest["samples"][0]
    save_file({"latents": torch.randn(5, 2, 18, 22), "prompt_embeds": torch.randn(6, 16)}, str(sample))
    fails(3, "calibrate", work, "--data", data, match=sample.name)
    save_file({"latents": torch.randn(4, 2, 18, 22).to(torch.int32), "prompt_embeds": torch.randn(6, 16)}, str(sample))
    fails(3, "calibrate", work, "--data", data, match=sample.name)
    assert not (work / "checkpoints").exists()


def test_corrupt_sla2_tensors(tmp_path, tiny_wan_dir):
    work = _workdir(tmp_path, tiny_wan_dir)
    (work / "sla2.safetensors").write_bytes(b"\x00garbage")
    fails(3, "validate", work, match="sla2.safetensors")


def test_not_a_workdir(tmp_path, tiny_wan_dir):
    fails(3, "calibrate", tiny_wan_dir, match="not a slaconv work dir")
    fails(3, "validate", tmp_path / "missing", match="work dir not found")


def test_cuda_requested_without_gpu(tmp_path, tiny_wan_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails(3, "convert", tiny_wan_dir, "-o", tmp_path / "w", "--device", "cuda", match="no CUDA GPU")


@pytest.mark.parametrize("verb", ["convert", "calibrate", "validate", "prepare"])
def test_unknown_device_name_is_a_usage_error(tmp_path, tiny_wan_dir, verb):
    work = _workdir(tmp_path, tiny_wan_dir) if verb in ("calibrate", "validate") else None
    args = {"convert": [tiny_wan_dir, "-o", tmp_path / "w2"], "calibrate": [work], "validate": [work],
            "prepare": [tmp_path / "d", "--pipeline", tiny_wan_dir, "--captions", tmp_path / "c.jsonl"]}[verb]
    fails(2, verb, *args, "--device", "gpu0", match="unknown device 'gpu0'")


def test_block_size_and_quant_flags_take_only_supported_values(tmp_path, tiny_wan_dir):
    res = run("convert", tiny_wan_dir, "-o", tmp_path / "w", "--block-q", 96, code=2)
    assert "'96' is not one of '64', '128'" in res.output
    res = run("convert", tiny_wan_dir, "-o", tmp_path / "w", "--quant", "fp4", code=2)
    assert "'fp4' is not one of 'none', 'int8', 'int8-fp8'" in res.output
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("eval_samples,match", [(2, "stage 2 left the model worse than it started"),
                                                 (0, "the stage-2 loss became nan")])
def test_nan_during_calibration_stops_and_keeps_the_weights(tmp_path, tiny_wan_dir, eval_samples, match):
    """lr 1e30: the first update wrecks the weights.  With held-out samples the first checkpoint's score shows
    it; without them the next loss is NaN.  Either way: exit 6, one line, the work dir's weights untouched."""
    work = _workdir(tmp_path, tiny_wan_dir, **{"calibration.stage2.steps": 6, "calibration.stage2.grad_clip": 0.0,
                                               "calibration.eval_samples": eval_samples})
    weights_before = dir_snapshot(work)["diffusion_pytorch_model.safetensors"]
    line = fails(6, "calibrate", work, "--stage", "2", "--lr", 1e30, match=match)
    assert "keeps its weights" in line and "--overwrite" in line
    assert dir_snapshot(work)["diffusion_pytorch_model.safetensors"] == weights_before


def test_no_traceback_in_a_real_process(tmp_path):
    """The installed console script, as a user runs it: one line on stderr, exit 3."""
    res = subprocess.run([sys.executable, "-m", "slaconv", "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "w")],
                         capture_output=True, text=True)
    assert res.returncode == 3
    assert res.stderr.strip().startswith("error: ") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("stage", ["1", "2"])
def test_out_of_memory_says_what_to_change(tmp_path, tiny_wan_dir, monkeypatch, stage):
    from slaconv.calibrate import stage1, stage2

    stage_module = {"1": stage1, "2": stage2}[stage]

    work = _workdir(tmp_path, tiny_wan_dir)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(stage_module, "denoiser_forward", oom)
    line = fails(8, "calibrate", work, "--stage", stage, match="out of memory in stage " + stage)
    assert "batch_size" in line or "query_blocks_per_step" in line
    assert "Tried to allocate" not in line  # no raw CUDA trace


def test_latents_that_do_not_tile_into_patches(tmp_path, tiny_wan_dir):
    work = _workdir(tmp_path, tiny_wan_dir)
    data = tmp_path / "odd"
    run("synth-data", data, "--model", work, "--num-samples", 2, "--width", 21)
    fails(3, "calibrate", work, "--data", data, match="not a multiple of the model's patch size 1x2x2")
    recipe = write_recipe(tmp_path / "odd.yaml", **{"data.height": 17})
    fails(3, "calibrate", work, "--recipe", recipe, match="recipe data")
    assert not (work / "checkpoints").exists()


def test_convert_with_recipe_latents_that_do_not_tile(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "odd.yaml", **{"data.width": 23})
    fails(3, "convert", tiny_wan_dir, "-o", tmp_path / "w", "--recipe", recipe, match="patch size")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, match", [
    (["convert", "--bogus"], "No such option '--bogus'"),
    (["convert", "m", "-o", "w", "--quant", "fp4"], "'fp4' is not one of"),
    (["convert"], "Missing argument 'MODEL'"),
    (["nosuchverb"], "No such command 'nosuchverb'"),
])
def test_command_line_mistakes_are_one_line_exit_2(args, match):
    line = fails(2, *args, match=match)
    assert "--help" in line  # says where to look


def test_global_flags_may_follow_the_verb(tmp_path, tiny_wan_dir):
    res = CliRunner().invoke(main, ["convert", str(tiny_wan_dir), "-o", str(tmp_path / "w"), "--dry-run", "-q",
                                    "--offline", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dry_run"] and res.stderr == ""


def test_missing_local_paths_are_input_errors_not_hub_lookups(tmp_path):
    fails(3, "inspect", tmp_path / "nosuch_dir", match="does not exist")
    fails(3, "inspect", "./nosuch_dir", match="does not exist")
    with pytest.raises(InputError, match="does not exist"):
        slaconv.from_pretrained(tmp_path / "nosuch_dir")


def test_unreachable_hub_is_a_network_error(tmp_path):
    """No network (and not --offline): exit 5 and a message about the network, not 'offline'."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    res = subprocess.run([sys.executable, "-m", "slaconv", "convert", "no-org/no-model", "-o", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 5, res.stderr
    assert res.stderr.startswith("error: could not reach the Hub") and len(res.stderr.strip().splitlines()) == 1


def test_base_of_another_architecture(tmp_path, tiny_wan_dir):
    work = _workdir(tmp_path, tiny_wan_dir)
    other = tmp_path / "other"
    make_wan(num_layers=3).save_pretrained(other)
    fails(3, "validate", work, "--base", other, match="num_layers is 3 there, 2 here")
    assert not (work / "reports").exists()


def test_unknown_quant_mode_fails_before_loading(tmp_path, tiny_wan_dir, monkeypatch):
    work = _workdir(tmp_path, tiny_wan_dir)
    import slaconv.workdir as workdir_module

    monkeypatch.setattr(workdir_module, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="quant must be one of"):
        slaconv.from_pretrained(work, quant="fp4")


def test_convert_refuses_a_model_that_is_already_converted(tmp_path, tiny_wan_dir):
    """A work dir (or a downloaded SLA2 package, which has sla2.safetensors) as MODEL: converting it again would
    silently drop its router, alpha and recipe, so convert refuses and says what to do instead."""
    work = _workdir(tmp_path, tiny_wan_dir)
    before = dir_snapshot(work)
    line = fails(3, "convert", work, "-o", tmp_path / "again", match="already an SLA2 model")
    assert f"slaconv calibrate {work}" in line and "original model" in line
    fails(3, "convert", work, "-o", tmp_path / "again", "--dry-run", match="already an SLA2 model")
    package = tmp_path / "package"  # what a Hub download of the weights holds: no sla2_config.json
    shutil.copytree(work, package, ignore=shutil.ignore_patterns("sla2_config.json", "recipe.yaml", "local.json"))
    fails(3, "convert", package, "-o", tmp_path / "again", match="already an SLA2 model")
    assert dir_snapshot(work) == before and not (tmp_path / "again").exists()


@pytest.mark.parametrize("verb", ["convert", "calibrate", "validate"])
def test_device_is_checked_before_anything_runs(tmp_path, tiny_wan_dir, verb):
    work = _workdir(tmp_path, tiny_wan_dir) if verb in ("calibrate", "validate") else None
    args = {"convert": [tiny_wan_dir, "-o", tmp_path / "w2", "--dry-run"], "calibrate": [work, "--dry-run"],
            "validate": [tmp_path / "no-such-work-dir"]}[verb]
    fails(2, verb, *args, "--device", "foo", match="unknown device 'foo'")
    fails(2, verb, *args, "--device", "mps", match="device 'mps' is not supported")
    assert not (tmp_path / "w2").exists()
