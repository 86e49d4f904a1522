"""Work dirs of the quality table's rows: one copy per stage, the ablation edits the CLI has no flag for
(pinning alpha, zeroing the router), and loading a work dir for scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import slaconv
from slaconv.config import FORMAT_NAME
from slaconv.workdir import WorkDir

PIN = 20.0  # |alpha_logit| that pins alpha to 1 or 0: sigmoid(20) = 1 - 2.1e-9


def copy_workdir(src: Path, dst: Path) -> Path:
    """Replace ``dst`` by a copy of the work dir ``src`` without its training checkpoints."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", ".staging-*"))
    return dst


def edit_sla2_state(workdir: Path, *, alpha_logit: float | None = None, zero_router: bool = False,
                    random_router_seed: int | None = None) -> dict:
    """Rewrite the work dir's SLA2 state in place: every alpha logit set to ``alpha_logit``, and/or the router's
    projections zeroed, or replaced by standard normal matrices drawn with ``random_router_seed``.  Each edit
    is appended to the work dir's ``ablation.json``."""
    path = WorkDir(workdir).sla2_state_path
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(random_router_seed) if random_router_seed is not None else None
    for key in sorted(state):
        if alpha_logit is not None and key.endswith(".alpha_logit"):
            state[key] = torch.full_like(state[key], alpha_logit)
        if key.endswith(".router_q") or key.endswith(".router_k"):
            if zero_router:
                state[key] = torch.zeros_like(state[key])
            elif gen is not None:
                state[key] = torch.randn(state[key].shape, generator=gen)
    save_file(state, str(path), metadata={"format": FORMAT_NAME})
    note = {"alpha_logit": alpha_logit, "zero_router": zero_router, "random_router_seed": random_router_seed}
    log = workdir / "ablation.json"
    edits = json.loads(log.read_text()) if log.is_file() else []
    log.write_text(json.dumps(edits + [note], indent=2) + "\n")
    return note


def alpha_range(workdir: Path) -> list[float]:
    """[min, mean, max] of alpha = sigmoid(alpha_logit) over every layer of the work dir."""
    state = WorkDir(workdir).read_sla2_state()
    a = torch.cat([torch.sigmoid(v.float()) for k, v in state.items() if k.endswith(".alpha_logit")])
    return [round(float(a.min()), 6), round(float(a.mean()), 6), round(float(a.max()), 6)]


def load_sla2(workdir: Path, device, quant: str | None = None):
    """The work dir's SLA2 model in eval mode (``quant`` overrides its low-bit mode)."""
    return slaconv.from_pretrained(workdir, device=device, quant=quant).eval()
