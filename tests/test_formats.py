"""The package format: plain-diffusers loadable, strict SLA2 loading, bit-exact round trips, pipelines."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import slaconv
from helpers import run, write_recipe
from slaconv.errors import InputError
from slaconv.install import sla2_processors


@pytest.fixture()
def calibrated(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml")
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe)
    run("calibrate", work)
    return work


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 18, 22, generator=g), timestep=torch.tensor([321.0]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=g), return_dict=False)


def test_plain_diffusers_loads_without_errors_or_warnings(calibrated, caplog):
    from diffusers import WanTransformer3DModel

    with caplog.at_level(logging.WARNING):
        model, info = WanTransformer3DModel.from_pretrained(calibrated, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "diffusers" in r.name]
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs())[0]).all()


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
    from slaconv.workdir import save_model_files

    copy = tmp_path / "copy"
    copy.mkdir()
    save_model_files(a, get_family("wan"), copy)
    shutil.copy(calibrated / "sla2_config.json", copy / "sla2_config.json")
    b = slaconv.from_pretrained(copy)
    state_b = b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    with torch.no_grad():
        assert torch.equal(a(**_inputs())[0], b(**_inputs())[0])
    trained = load_file(str(calibrated / "sla2.safetensors"))
    for name, proc in sla2_processors(b).items():
        assert torch.equal(proc.router_q.detach(), trained[f"{name}.router_q"])


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
