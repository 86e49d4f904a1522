"""The package format: plain-diffusers loadable, strict SLA2 loading, bit-exact round trips, pipelines."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import slaconv
from helpers import run, tiny_wan_inputs, write_recipe
from slaconv.config import SLA2Config
from slaconv.errors import InputError
from slaconv.install import sla2_processors
from slaconv.processor import hedgehog_init
from slaconv.push import check_workdir
from slaconv.workdir import WorkDir


@pytest.fixture()
def calibrated(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml")
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    run("calibrate", work)
    return work


def test_plain_diffusers_loads_without_errors_or_warnings(calibrated, caplog):
    from diffusers import WanTransformer3DModel

    with caplog.at_level(logging.WARNING):
        model, info = WanTransformer3DModel.from_pretrained(calibrated, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "diffusers" in r.name]
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_wan_inputs())[0]).all()


def test_config_json_has_no_quantization_config(calibrated):
    assert "quantization_config" not in json.loads((calibrated / "config.json").read_text())
    cfg = json.loads((calibrated / "sla2_config.json").read_text())
    for key in ("format", "format_version", "block_q", "block_k", "topk", "feature_map", "quant", "alpha_granularity",
                "layers", "base_model", "slaconv_version", "recipe_hash", "calibration"):
        assert key in cfg, key
    assert cfg["base_model"]["content_hash"].startswith("sha256:")


def test_save_load_round_trip_is_bit_exact(calibrated, tmp_path):
    a = slaconv.from_pretrained(calibrated)
    state_a = {k: v.clone() for k, v in a.state_dict().items()}
    # Save the loaded model again through the same writer and load that copy.
    from slaconv.families import get_family

    copy = tmp_path / "copy"
    copy.mkdir()
    WorkDir(copy).save_model(a, get_family("wan"))
    shutil.copy(calibrated / "sla2_config.json", copy / "sla2_config.json")
    b = slaconv.from_pretrained(copy)
    state_b = b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    with torch.no_grad():
        assert torch.equal(a(**tiny_wan_inputs())[0], b(**tiny_wan_inputs())[0])
    trained = load_file(str(calibrated / "sla2.safetensors"))
    for name, proc in sla2_processors(b).items():
        assert torch.equal(proc.router_q.detach(), trained[f"{name}.router_q"])


def test_save_pretrained_of_a_loaded_model_round_trips(calibrated, tmp_path):
    """model.save_pretrained on a model from slaconv.from_pretrained writes the SLA2 layout (plain diffusers
    weights, sla2.safetensors, sla2_config.json with its summaries), which both loaders read back exactly."""
    from diffusers import WanTransformer3DModel

    model = slaconv.from_pretrained(calibrated)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    again = slaconv.from_pretrained(saved)
    state_a, state_b = model.state_dict(), again.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    with torch.no_grad():
        assert torch.equal(model(**tiny_wan_inputs())[0], again(**tiny_wan_inputs())[0])
    _, info = WanTransformer3DModel.from_pretrained(saved, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    original, copy = (json.loads((d / "sla2_config.json").read_text()) for d in (calibrated, saved))
    assert copy == original
    assert (saved / "sla2.safetensors").read_bytes() == (calibrated / "sla2.safetensors").read_bytes()
    other = tmp_path / "other"
    slaconv.save_pretrained(again, other)  # the function behind it
    assert {p.name for p in other.iterdir()} == {p.name for p in saved.iterdir()}
    for name in ("sla2.safetensors", "sla2_config.json", "diffusion_pytorch_model.safetensors"):
        assert (other / name).read_bytes() == (saved / name).read_bytes(), name


def test_save_pretrained_of_a_model_converted_in_memory(tmp_path):
    from helpers import make_wan

    model = make_wan()
    slaconv.sla2_(model, SLA2Config(topk=0.5, block_q=64, block_k=64, quant="none"), alpha_init=0.3)
    model.save_pretrained(tmp_path / "m")
    loaded = slaconv.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(**tiny_wan_inputs())[0], loaded(**tiny_wan_inputs())[0])
    assert sla2_processors(loaded)["blocks.1.attn1"].config == SLA2Config(topk=0.5, block_q=64, block_k=64,
                                                                           quant="none")


def test_hedgehog_work_dir_stores_feature_weights_and_round_trips(tmp_path, tiny_wan_dir):
    work, saved = tmp_path / "w", tmp_path / "saved"
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage2.steps": 0})
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--feature-map", "hedgehog")
    run("calibrate", work, "--stage", "1")
    assert json.loads((work / "sla2_config.json").read_text())["feature_map"] == "hedgehog"
    assert "feature map hedgehog" in run("inspect", work).stdout
    stored = load_file(str(work / "sla2.safetensors"))
    model = slaconv.from_pretrained(work)
    for name, proc in sla2_processors(model).items():
        assert proc.config.feature_map == "hedgehog"
        for t in ("feature_q", "feature_k"):
            assert stored[f"{name}.{t}"].shape == (2, 24, 12)
            assert not torch.equal(stored[f"{name}.{t}"], hedgehog_init(2, 24))  # stage 1 trained them
            assert torch.equal(getattr(proc, t).detach(), stored[f"{name}.{t}"])
    model.save_pretrained(saved)
    again = slaconv.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(model(**tiny_wan_inputs())[0], again(**tiny_wan_inputs())[0])
    assert (saved / "sla2.safetensors").read_bytes() == (work / "sla2.safetensors").read_bytes()
    check_workdir(work)
    stored.pop("blocks.0.attn1.feature_k")
    save_file(stored, str(work / "sla2.safetensors"))
    with pytest.raises(InputError, match="missing SLA2 tensors"):
        slaconv.from_pretrained(work)
    with pytest.raises(InputError, match="lacks blocks.0.attn1.feature_k"):  # what push checks first
        check_workdir(work)


@pytest.mark.parametrize("damage,match", [
    ("missing", "missing SLA2 tensors"),
    ("extra", "unexpected SLA2 tensors"),
    ("shape", "has shape"),
])
def test_from_pretrained_fails_loudly_on_bad_sla2_state(calibrated, damage, match):
    path = calibrated / "sla2.safetensors"
    state = load_file(str(path))
    if damage == "missing":
        state.pop("blocks.1.attn1.alpha_logit")
    elif damage == "extra":
        state["blocks.2.attn1.alpha_logit"] = torch.zeros(2)
    else:
        state["blocks.0.attn1.router_k"] = torch.zeros(2, 12, 12)
    save_file(state, str(path))
    with pytest.raises(InputError, match=match):
        slaconv.from_pretrained(calibrated)


def test_from_pretrained_on_plain_diffusers_folder_is_an_error(tiny_wan_dir):
    with pytest.raises(InputError, match="not an SLA2 model"):
        slaconv.from_pretrained(tiny_wan_dir)


def test_loaded_transformer_runs_in_stock_wan_pipeline(calibrated):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = slaconv.from_pretrained(calibrated)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=transformer)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 6, 16, generator=g)
    common = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), height=144, width=176,
                  num_frames=5, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    latents = pipe(generator=torch.Generator().manual_seed(1), **common).frames
    assert latents.shape == (1, 4, 2, 18, 22) and torch.isfinite(latents).all()
    # The SLA2 layers really ran: dense processors give a different result from the same noise.
    for proc in sla2_processors(transformer).values():
        proc.mode = "dense"
    dense = pipe(generator=torch.Generator().manual_seed(1), **common).frames
    assert not torch.allclose(latents, dense)


# sla2_config.json as slaconv 0.1.0 wrote it after convert, calibrate and validate (summaries shortened, a
# hand-added "license"), for the tiny Wan model with the settings of tests/test_cli.write_recipe.
SLA2_CONFIG_0_1_0 = """{
  "format": "slaconv-sla2",
  "format_version": 1,
  "slaconv_version": "0.1.0",
  "family": "wan",
  "base_model": {
    "id": null,
    "name": "base",
    "revision": null,
    "subfolder": null,
    "content_hash": "sha256:7b62fb42742e6ca3205dda2a4ef70b93322c4fd5194cea8625dc36dfa7360dfc",
    "sla_checkpoint": null
  },
  "block_q": 64,
  "block_k": 64,
  "topk": 0.4,
  "topk_per_layer": {},
  "feature_map": "softmax",
  "quant": "int8-fp8",
  "alpha_granularity": "head",
  "router": {
    "projections": "per-head d x d, no bias",
    "init": "identity"
  },
  "layers": [
    "blocks.0.attn1",
    "blocks.1.attn1"
  ],
  "recipe_hash": "1967d30811f53c9b",
  "calibration": {
    "stage1": {
      "steps": 2,
      "tau": 0.1,
      "lr": 0.0001,
      "alpha_lr": 0.05,
      "data": "synthetic"
    },
    "stage2": {
      "steps": 2,
      "objective": "distill",
      "lr": 1e-05,
      "teacher": "online",
      "quant": "int8-fp8",
      "data": "synthetic"
    }
  },
  "validation": {
    "passed": true,
    "sparsity_mean": 0.44507576525211334,
    "quant": "int8-fp8"
  },
  "alpha_init": {
    "method": "calibrate",
    "selected_mass": {
      "mean": 0.6094,
      "lowest_layer": "blocks.1.attn1",
      "lowest_layer_mean": 0.5587
    }
  },
  "license": "apache-2.0"
}
"""


def test_work_dir_written_by_earlier_slaconv_loads_bit_exact_and_rewrites_unchanged(calibrated):
    ours = slaconv.from_pretrained(calibrated)
    (calibrated / "sla2_config.json").write_text(SLA2_CONFIG_0_1_0)
    theirs = slaconv.from_pretrained(calibrated)
    state = ours.state_dict()
    assert all(torch.equal(state[k], v) for k, v in theirs.state_dict().items())
    with torch.no_grad():
        assert torch.equal(ours(**tiny_wan_inputs())[0], theirs(**tiny_wan_inputs())[0])

    work = WorkDir(calibrated)
    config = work.read_sla2_config()
    assert config.attention == SLA2Config(topk=0.4, block_q=64, block_k=64, quant="int8-fp8")
    assert config.attention.mixing == "head" and "mixing" not in work.measured_settings()  # digests unchanged
    assert config.layers == ("blocks.0.attn1", "blocks.1.attn1") and config.extra == {"license": "apache-2.0"}
    assert config.budget is None  # written before per-layer budgets: a uniform one, and it stays absent
    work.write_sla2_config(config)
    assert (calibrated / "sla2_config.json").read_text() == SLA2_CONFIG_0_1_0


@pytest.mark.parametrize("change,match", [
    ({"quant": "fp4"}, "quant must be one of"),
    ({"topk": 0}, "topk must be in"),
    ({"format_version": 99}, "newer than this slaconv"),
    ({"format": "other"}, "expected 'slaconv-sla2'"),
    ({"layers": "blocks.0.attn1"}, "layers must be a list"),
])
def test_bad_sla2_config_is_a_one_line_input_error(calibrated, change, match):
    config = json.loads(SLA2_CONFIG_0_1_0)
    config.update(change)
    (calibrated / "sla2_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=match):
        slaconv.from_pretrained(calibrated)
    del config["quant"]
    (calibrated / "sla2_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError):
        WorkDir(calibrated).read_sla2_config()


def test_source_and_work_dir_modules_import_one_way():
    """workdir builds on source (loading diffusers models); source knows nothing of work dirs."""
    import subprocess
    import sys

    code = "import sys, slaconv.source; print('slaconv.workdir' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


def test_work_dir_names_and_paths(tmp_path):
    work = WorkDir(tmp_path / "w")
    assert (work.MODEL_CONFIG, work.WEIGHTS) == ("config.json", "diffusion_pytorch_model.safetensors")
    assert work.sla2_config_path == tmp_path / "w" / "sla2_config.json"
    assert work.checkpoints_dir(2) == tmp_path / "w" / "checkpoints" / "stage2"
    assert work.log_path(1) == tmp_path / "w" / "logs" / "stage1.jsonl"
    assert work.read_local() == {} and work.read_recipe() is None and work.read_validation_report() is None
    with pytest.raises(InputError, match="work dir not found"):
        WorkDir.open(tmp_path / "w")
    work.path.mkdir()
    with pytest.raises(InputError, match="not a slaconv work dir"):
        WorkDir.open(work)
