"""Stage 2's regression targets: the dense teacher's velocity (``distill``) or flow matching's."""

from __future__ import annotations

import torch

from .. import flow
from ..progress import progress


class TeacherTargets:
    """The distillation targets (the dense teacher's velocity) of stage 2, by sampler and batch index.

    ``online``: the teacher stays on the device and runs beside the student at every step.
    ``precompute``: before each checkpoint interval the teacher is loaded, computes the targets of that
    interval's micro-batches (and, once, of the held-out samples), which are kept on the host, and is
    freed again; so its weights (28.6 GB in bf16 for a 14B model, whole on every rank under FSDP) never
    share the device with the student's gradients and optimizer state, and host memory holds one
    interval's targets.  Batches are functions of (seed, index) alone, so both modes give the same numbers.
    """

    def __init__(self, run, load_teacher, autocast, device, mode: str):
        """``run(teacher, batch, x_t, sigma)`` is one teacher forward; ``load_teacher(verify)`` loads it."""
        self.run, self.load_teacher, self.autocast, self.device, self.mode = run, load_teacher, autocast, device, mode
        self.teacher = load_teacher(True) if mode == "online" else None
        self.loads = 0  # the first load checks the base model's content hash, the later ones need not
        self.stored: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def _target(self, batch) -> torch.Tensor:
        x_t = flow.add_noise(batch["latents"], batch["noise"], batch["sigma"])
        with self.autocast():
            return self.run(self.teacher, batch, x_t, batch["sigma"])

    def precompute(self, work: dict, show_progress: bool) -> None:
        """(precompute mode) For each ``name: (sampler, indices)`` of ``work``, replace the stored ``name``
        targets by those of ``indices``; the teacher is loaded for this and freed after."""
        if self.mode != "precompute":
            return
        self.stored = {key: t for key, t in self.stored.items() if key[0] not in work}
        todo = [(name, sampler, i) for name, (sampler, indices) in work.items() for i in indices]
        self.teacher = self.load_teacher(self.loads == 0)
        self.loads += 1
        try:
            for name, sampler, i in progress(todo, desc="stage 2 teacher targets", enabled=show_progress):
                self.stored[name, i] = self._target(sampler.batch(i)).cpu()
        finally:
            self.teacher = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, name: str, index: int, batch) -> torch.Tensor:
        """The fp32 target of ``batch``, index ``index`` of the ``name`` sampler, on the device."""
        if self.mode == "precompute":
            return self.stored[name, index].to(self.device).float()
        return self._target(batch).float()


def stage2_target(targets: TeacherTargets | None, name: str, index: int, batch, device) -> torch.Tensor:
    """The fp32 stage-2 target of a batch: the teacher's velocity (distill) or flow matching's (diffusion)."""
    if targets is not None:
        return targets.get(name, index, batch)
    return flow.velocity_target(batch["latents"], batch["noise"]).to(device).float()
