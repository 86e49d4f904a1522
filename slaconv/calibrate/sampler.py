"""The batches of calibration: every sample, its noise and its noise level follow from (seed, index).

Every step's randomness is a function of (seed, step), so a resumed run replays exactly the
batches, noise and timesteps of an uninterrupted one.
"""

from __future__ import annotations

import torch

from .. import flow
from ..inputs import check_latent_shape


class StepSampler:
    """Deterministic batches: every sample, its noise and its noise level are functions of
    (seed, global sample index) alone.

    Process ``rank`` of ``world`` takes samples ``step * B * world + rank * B + j``, so a run on N
    processes with per-process batch B sees exactly the samples of a one-process run with batch
    N * B, and a resumed run sees exactly those of an uninterrupted one.
    """

    def __init__(self, family, model_config, recipe, batch_size, data_dir=None, rank=0, world=1):
        self.family, self.model_config, self.recipe = family, model_config, recipe
        self.batch_size, self.seed, self.rank, self.world = batch_size, recipe.calibration.seed, rank, world
        self.shift = recipe.calibration.stage2.timestep_shift
        self.dataset = None
        if data_dir is not None:
            from ..data import CalibrationDataset

            self.dataset = CalibrationDataset(data_dir, expected_channels=family.latent_channels(model_config),
                                              expected_text_dim=family.text_dim(model_config))
            check_latent_shape(family, model_config, *self.dataset.latent_shape[1:], where=str(data_dir))
        else:
            d = recipe.data
            check_latent_shape(family, model_config, d.frames, d.height, d.width, where="recipe data")

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A generator for per-step choices shared by all processes (e.g. stage-1 query blocks)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63))

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 2_654_435_761 + index * 40_503 + 17) % (2**63))
        if self.dataset is None:
            from ..inputs import synthetic_batch

            item = {k: v[0]
                    for k, v in synthetic_batch(self.family, self.model_config, self.recipe.data, 1, gen).items()}
        else:
            n = len(self.dataset)
            epoch_order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 31 * (index // n)))
            item = dict(self.dataset[int(epoch_order[index % n])])
        item["noise"] = torch.randn(item["latents"].shape, generator=gen)
        item["sigma"] = flow.sample_sigmas(1, self.shift, gen, "cpu")[0]
        return item

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        first = (step * self.world + self.rank) * self.batch_size
        items = [self._sample(first + j) for j in range(self.batch_size)]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

