"""Model inputs for calibration and validation: from a data folder or synthetic (data-free)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import InputError
from .families import Family
from .recipe import DataSettings


def check_latent_shape(family: Family, model_config: dict, frames: int, height: int, width: int, where: str) -> None:
    """Latent (F, H, W) must tile into the model's patches, else the patch embedding drops pixels."""
    pt, ph, pw = family.patch_size(model_config)
    if frames % pt or height % ph or width % pw:
        raise InputError(f"{where}: latent frames x height x width {frames}x{height}x{width} is not a multiple of "
                         f"the model's patch size {pt}x{ph}x{pw}")


CONDITIONING = ("image_embeds", "pooled_embeds", "prompt_mask")
"""Sample tensors beside latents and prompt_embeds that :attr:`Family.make_inputs` takes, where present."""


def synthetic_batch(family: Family, model_config: dict, data_cfg: DataSettings, batch: int,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random latents at the recipe resolution and random text embeddings (seeded); for families that take
    them, a pooled text embedding and a text mask keeping a random number of leading tokens."""
    c = family.latent_channels(model_config)
    latents = torch.randn(batch, c, data_cfg.frames, data_cfg.height, data_cfg.width, generator=generator)
    embeds = torch.randn(batch, data_cfg.text_len, family.text_dim(model_config), generator=generator)
    out = {"latents": latents, "prompt_embeds": embeds}
    pooled = family.pooled_dim(model_config)
    if pooled:
        out["pooled_embeds"] = torch.randn(batch, pooled, generator=generator)
    if family.text_mask:
        real = torch.randint(1, data_cfg.text_len + 1, (batch, 1), generator=generator)
        out["prompt_mask"] = (torch.arange(data_cfg.text_len).view(1, -1) < real).float()
    return out


def batches(family: Family, model_config: dict, data_cfg: DataSettings, batch: int, generator: torch.Generator,
            data_dir=None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: shuffled passes over ``data_dir`` (seeded), or synthetic ones."""
    if data_dir is None:
        while True:
            yield synthetic_batch(family, model_config, data_cfg, batch, generator)
    from .data import CalibrationDataset, collate

    dataset = CalibrationDataset(data_dir, expected_channels=family.latent_channels(model_config),
                                 expected_text_dim=family.text_dim(model_config))
    n = len(dataset)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch):
            yield collate([dataset[order[(start + j) % n]] for j in range(batch)])


def denoiser_forward(model, family: Family, batch: dict, x_t: torch.Tensor, sigma: torch.Tensor, device,
                     dtype: torch.dtype) -> torch.Tensor:
    """The model's flow-matching velocity for the noisy latents ``x_t`` at noise level ``sigma`` (timestep
    1000 * sigma), conditioned on ``batch``'s text (and image) embeddings, inputs moved to ``device`` in
    ``dtype``."""
    conditioning = {key: batch[key].to(device, dtype) for key in CONDITIONING if key in batch}
    x_t, timestep = x_t.to(device, dtype), (sigma * 1000).to(device)
    kwargs = family.make_inputs(model, x_t, timestep, batch["prompt_embeds"].to(device, dtype), **conditioning)
    return family.read_output(model, model(**kwargs)[0], x_t, timestep)
