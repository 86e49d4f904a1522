"""Flow matching as Wan uses it: x_t = (1 - s) x0 + s * noise, the model predicts v = noise - x0.

Timesteps are ``1000 * s`` with the shifted schedule ``s' = shift * s / (1 + (shift - 1) * s)``
of diffusers' ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import torch


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(batch: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Training noise levels: uniform s in (0, 1), then shifted; shape (B,)."""
    u = torch.rand(batch, generator=generator).clamp(1e-3, 1 - 1e-3)
    return shift_sigma(u, shift).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Descending noise levels for an Euler sampler: steps + 1 values from ~1 to 0."""
    s = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    return torch.cat([shift_sigma(s, shift), torch.zeros(1)])


@torch.no_grad()
def euler_sample(predict, noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """Integrate dx/ds = v from s = 1 to 0; ``predict(x, timestep)`` returns v."""
    sigmas = sampling_sigmas(steps, shift)
    x = noise
    for i in range(steps):
        t = (sigmas[i] * 1000).expand(x.shape[0]).to(x.device)
        v = predict(x, t)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v.to(x.dtype)
    return x
