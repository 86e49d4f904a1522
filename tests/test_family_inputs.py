"""Each family's calibration inputs against its diffusers pipeline: latent packing, position ids and RoPE as the
pipeline builds them, and CogVideoX's v-prediction read back as the flow-matching velocity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from family_testers import TESTERS
from slaconv.config import KERNEL_HEAD_DIMS
from slaconv.errors import InputError
from slaconv.families import get_family
from slaconv.families.packing import pack, unpack

# The published transformer configs' attention shapes (heads, head dim): the diffusers defaults of each class,
# which the released checkpoints use (Flux.1-dev and -schnell, HunyuanVideo, LTX-Video 0.9.x), and CogVideoX-5B.
PUBLISHED = {
    "flux": ("FluxTransformer2DModel", {}),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", {}),
    "ltx_video": ("LTXVideoTransformer3DModel", {}),
    "cogvideox": ("CogVideoXTransformer3DModel", {"num_attention_heads": 48, "num_layers": 42,
                                                  "use_rotary_positional_embeddings": True}),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_published_architectures_run_on_the_kernels(family):
    """Every converted layer of the real models has a head dim the Triton kernels take (128 for Flux and
    HunyuanVideo, 64 for CogVideoX and LTX-Video), so none falls back to the reference on a GPU."""
    import diffusers

    class_name, overrides = PUBLISHED[family]
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**overrides)
    from slaconv.install import resolve_targets

    fam = get_family(family)
    layers = resolve_targets(model, fam, [], [])
    modules = dict(model.named_modules())
    shapes = {fam.head_shape(modules[name]) for name in layers}
    assert len(shapes) == 1 and next(iter(shapes))[1] in KERNEL_HEAD_DIMS, shapes


def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 1, 12, 10)
    tokens = FluxPipeline._pack_latents(latents[:, :, 0], 2, 16, 12, 10)
    assert torch.equal(pack(latents, 1, 2), tokens)
    assert torch.equal(unpack(tokens, latents.shape, 1, 2)[:, :, 0],
                       FluxPipeline._unpack_latents(tokens, 12 * 8, 10 * 8, 8))
    model = TESTERS["flux"].build()
    kwargs = get_family("flux").make_inputs(model, latents[:, :1], torch.tensor([400.0, 400.0]),
                                            torch.randn(2, 7, 32), pooled_embeds=torch.randn(2, 32))
    assert torch.equal(kwargs["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 6, 5, "cpu", torch.float32))
    assert torch.equal(kwargs["txt_ids"], torch.zeros(7, 3)) and torch.equal(kwargs["timestep"], torch.full((2,), 0.4))
    with pytest.raises(InputError, match="pooled_embeds"):
        get_family("flux").make_inputs(model, latents[:, :1], torch.tensor([1.0]), torch.randn(2, 7, 32))


def test_ltx_packing_matches_the_pipeline():
    from diffusers import LTXPipeline

    latents = torch.randn(2, 8, 4, 6, 10)
    for patch_t, patch in ((1, 1), (2, 2)):
        tokens = LTXPipeline._pack_latents(latents, patch, patch_t)
        assert torch.equal(pack(latents, patch_t, patch), tokens)
        assert torch.equal(unpack(tokens, latents.shape, patch_t, patch),
                           LTXPipeline._unpack_latents(tokens, 4 // patch_t, 6 // patch, 10 // patch, patch, patch_t))


@pytest.mark.parametrize("patch_t", [None, 2])
def test_cogvideox_rotary_embedding_matches_the_pipeline(patch_t):
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    from slaconv.families.cogvideox import _rotary_embedding

    model = TESTERS["cogvideox"].build(variant="rope")
    model.register_to_config(patch_size_t=patch_t, sample_height=32, sample_width=48)
    frames, height, width = 4, 12, 20
    pipe = SimpleNamespace(transformer=model, vae_scale_factor_spatial=8)
    want = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height * 8, width * 8, frames, "cpu")
    got = _rotary_embedding(model, frames, height, width, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.5, 0.85, 0.999])
def test_cogvideox_v_prediction_reads_back_as_flow_velocity(sigma):
    """The model input is the flow sample at the same SNR on the model's schedule; the exact v-prediction for
    that input comes back as noise - x0."""
    from diffusers import CogVideoXDDIMScheduler

    fam = get_family("cogvideox")
    model = TESTERS["cogvideox"].build(variant="rope")  # RoPE: a 5B-style model, SNR shift 1.0
    g = torch.Generator().manual_seed(int(sigma * 1000))
    x0, noise = torch.randn(2, 4, 3, 16, 16, generator=g), torch.randn(2, 4, 3, 16, 16, generator=g)
    x_t = (1 - sigma) * x0 + sigma * noise
    timestep = torch.full((2,), 1000 * sigma)
    kwargs = fam.make_inputs(model, x_t, timestep, torch.randn(2, 8, 8, generator=g))
    x_in = kwargs["hidden_states"].permute(0, 2, 1, 3, 4).double()
    norm = ((1 - sigma) ** 2 + sigma**2) ** 0.5
    a, b = (1 - sigma) / norm, sigma / norm
    assert torch.allclose(x_in, a * x0.double() + b * noise.double(), atol=1e-5)
    schedule = CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=1.0).alphas_cumprod.double()
    t = float(kwargs["timestep"][0])
    if a**2 >= schedule[0]:  # less noise than the schedule's first step: the first step
        assert t == 0.0
    else:
        lo = int(t)
        alpha_bar = schedule[lo] + (t - lo) * (schedule[min(lo + 1, 999)] - schedule[lo])
        assert abs(float(alpha_bar) - a**2) < 1e-6
    v = (a * noise - b * x0).permute(0, 2, 1, 3, 4)
    velocity = fam.read_output(model, v, x_t, timestep)
    assert torch.allclose(velocity.double(), (noise - x0).double(), atol=1e-4)


@pytest.mark.parametrize("variant,shift", [(None, 3.0), ("rope", 1.0)])  # CogVideoX-2B, CogVideoX-5B
@pytest.mark.parametrize("step", [37, 400, 921])
def test_cogvideox_inputs_match_the_scheduler_at_its_own_steps(variant, shift, step):
    """At the flow level whose SNR is that of the scheduler's step t, the model gets the scheduler's own
    ``add_noise`` sample at timestep t, and its ``get_velocity`` target reads back as noise - x0."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=shift)
    fam, model = get_family("cogvideox"), TESTERS["cogvideox"].build(variant=variant)
    alpha_bar = scheduler.alphas_cumprod[step].double()
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    sigma = float(b / (a + b))  # (1 - sigma) / sigma = a / b: the same SNR
    g = torch.Generator().manual_seed(step)
    x0, noise = torch.randn(2, 4, 4, 16, 16, generator=g), torch.randn(2, 4, 4, 16, 16, generator=g)
    timestep = torch.full((2,), 1000 * sigma)
    kwargs = fam.make_inputs(model, (1 - sigma) * x0 + sigma * noise, timestep, torch.randn(2, 8, 8, generator=g))
    t = torch.full((2,), step)
    torch.testing.assert_close(kwargs["timestep"], t.float(), atol=2e-3, rtol=0)
    want = scheduler.add_noise(x0, noise, t).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(kwargs["hidden_states"], want, atol=1e-5, rtol=1e-5)
    v = scheduler.get_velocity(x0, noise, t).permute(0, 2, 1, 3, 4)
    velocity = fam.read_output(model, v, (1 - sigma) * x0 + sigma * noise, timestep)
    torch.testing.assert_close(velocity, noise - x0, atol=1e-4, rtol=1e-4)


def test_conditioning_constants_are_the_pipelines_defaults():
    """Flux's and HunyuanVideo's embedded guidance, LTX-Video's frame rate and VAE compression: the values the
    diffusers pipelines use by default, passed to the model in the pipelines' scale."""
    import inspect

    from diffusers import FluxPipeline, HunyuanVideoPipeline, LTXPipeline

    from slaconv.families import flux, hunyuan_video, ltx_video

    def default(pipeline, name):
        return inspect.signature(pipeline.__call__).parameters[name].default

    assert default(FluxPipeline, "guidance_scale") == flux.GUIDANCE_SCALE
    assert default(HunyuanVideoPipeline, "guidance_scale") == hunyuan_video.GUIDANCE_SCALE
    assert default(LTXPipeline, "frame_rate") == ltx_video.FRAME_RATE
    pipe = LTXPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    assert ltx_video.VAE_COMPRESSION == (pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio,
                                         pipe.vae_spatial_compression_ratio)

    g = torch.Generator().manual_seed(5)
    model = TESTERS["hunyuan_video"].build()
    kwargs = get_family("hunyuan_video").make_inputs(model, torch.randn(2, 4, 1, 16, 16, generator=g),
                                                     torch.tensor([300.0, 700.0]), torch.randn(2, 12, 16, generator=g),
                                                     pooled_embeds=torch.randn(2, 8, generator=g))
    assert torch.equal(kwargs["guidance"], torch.full((2,), hunyuan_video.GUIDANCE_SCALE) * 1000.0)
    model = TESTERS["flux"].build(variant="guidance")
    kwargs = get_family("flux").make_inputs(model, torch.randn(2, 1, 1, 12, 10, generator=g),
                                            torch.tensor([400.0, 400.0]), torch.randn(2, 7, 32, generator=g),
                                            pooled_embeds=torch.randn(2, 32, generator=g))
    assert torch.equal(kwargs["guidance"], torch.full((2,), flux.GUIDANCE_SCALE))
    model = TESTERS["ltx_video"].build()
    kwargs = get_family("ltx_video").make_inputs(model, torch.randn(1, 4, 1, 16, 16, generator=g),
                                                 torch.tensor([400.0]), torch.randn(1, 16, 16, generator=g))
    assert kwargs["rope_interpolation_scale"] == (8 / 25, 32, 32)


def test_synthetic_data_carries_pooled_embeddings_and_the_text_mask(tmp_path):
    """Flux and HunyuanVideo data hold a pooled embedding, HunyuanVideo's a mask of the real (non-zero) text
    tokens; a dataset without them (Wan's) is unchanged and its items hold neither."""
    from slaconv.data import CalibrationDataset
    from slaconv.synthetic_data import write_synthetic_dataset

    dims = dict(num_samples=3, channels=4, frames=1, height=8, width=8, text_len=12, text_dim=16, seed=5)
    plain = CalibrationDataset(write_synthetic_dataset(tmp_path / "plain", **dims))
    full = CalibrationDataset(write_synthetic_dataset(tmp_path / "full", pooled_dim=8, prompt_mask=True, **dims))
    assert plain.keys() == ("latents", "prompt_embeds") and "pooled_shape" not in plain.manifest
    assert full.keys() == ("latents", "prompt_embeds", "pooled_embeds", "prompt_mask")
    for i in range(3):
        a, b = plain[i], full[i]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
        assert b["pooled_embeds"].shape == (8,)
        real = b["prompt_embeds"].abs().sum(dim=1) > 0
        assert torch.equal(b["prompt_mask"].bool(), real) and 0 < int(real.sum()) <= 12
