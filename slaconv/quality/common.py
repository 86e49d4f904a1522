"""Shared pieces of the quality benchmark: model configs, generator streams, devices, the sampler, files."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from slaconv import flow
from slaconv.errors import InputError
from slaconv.quality import content
from slaconv.quality import synthvideo as sv
from slaconv.utils.devices import resolve_device
from slaconv.utils.files import read_json, write_text_atomic

# Streams of the generator (disjoint): training, held-out evaluation, slaconv calibration data,
# classifier training, single-frame training clips (joint image-video training).
TRAIN_SEED, HELDOUT_SEED, CALIB_SEED, CLASSIFIER_SEED, IMAGE_SEED = 0, 1, 2, 3, 4

# The original model: a small Wan2.1-architecture DiT.  4 heads x 64 (the SLA2 kernels take head
# dims 64/128), 6 layers, FFN 1024: 7.0 M parameters, 14 MB in fp16.
MODEL_CONFIG = {
    "patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 64, "in_channels": 4,
    "out_channels": 4, "text_dim": 32, "freq_dim": 256, "ffn_dim": 1024, "num_layers": 6,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
# --smoke: same architecture, 2 layers of 1 head x 64, on 4 x 32 x 32 videos (1,024 tokens).
SMOKE_MODEL_CONFIG = {**MODEL_CONFIG, "num_attention_heads": 1, "ffn_dim": 256, "num_layers": 2, "freq_dim": 64}

# Sampling used everywhere (training previews, the benchmark's fidelity and classifier metrics, every
# row of the table): 20 Euler steps, shift 3, classifier-free guidance scale SAMPLE_GUIDANCE against
# the null (all-zero) embedding.  The model learns the null embedding through conditioning dropout.
SAMPLE_STEPS, SAMPLE_SHIFT, SAMPLE_GUIDANCE = 20, 3.0, 5.0
SMOKE_SAMPLE_STEPS = 3


def spec_for(smoke: bool) -> sv.VideoSpec:
    """The default video spec: the small CPU one with ``smoke``, else the full-size one."""
    return sv.SMOKE_SPEC if smoke else sv.VideoSpec()


def trained_spec(model_dir: Path) -> tuple[content.Spec, float]:
    """The video spec and conditioning dropout the checkpoint was trained with.

    Read from ``train_summary.json`` next to the model folder (:mod:`slaconv.quality.train_dit` writes it
    there, and the shipped checkpoint carries it), so a checkpoint is always evaluated on the videos it
    learned.
    """
    path = Path(model_dir).parent / "train_summary.json"
    if not path.is_file():
        raise InputError(f"{path} not found: the training summary must lie next to the model folder")
    summary = read_json(path)
    if not isinstance(summary.get("spec"), dict):
        raise InputError(f"{path} has no video spec")
    return content.spec_from_dict(summary["spec"]), float(summary["settings"].get("cond_dropout", 0.0))


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unknown or absent device is a one-line SlaconvError."""
    return torch.device(resolve_device(requested))


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (for honest timings); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(config: dict, seed: int = 0):
    """A freshly initialised ``WanTransformer3DModel`` (seeded)."""
    from diffusers import WanTransformer3DModel  # slow to import; the generator and metrics need none of it

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config)


def load_model(folder: str | Path, device, dtype=torch.float32):
    """A saved original (diffusers folder) in eval mode on ``device``."""
    from diffusers import WanTransformer3DModel

    if not (Path(folder) / "config.json").is_file():
        raise InputError(f"{folder} is not a diffusers model folder (no config.json)")
    return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).to(device).eval()


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The model's velocity prediction at noise level ``sigma`` (B,) in [0, 1], fp32 out."""
    device = x.device
    with autocast(device):
        out = model(hidden_states=x, timestep=(sigma * 1000).to(device), encoder_hidden_states=emb,
                    return_dict=False)[0]
    return out.float()


def guided_velocity(model, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, null: torch.Tensor | None,
                    guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_null + guidance * (v_class - v_null)`` in one doubled batch.

    ``guidance == 1`` is the plain conditional velocity (``null`` is then not needed).
    """
    if guidance == 1.0:
        return velocity(model, x, sigma, emb)
    if null is None:
        raise ValueError("guidance != 1 needs the null embedding")
    b = x.shape[0]
    null = null.to(emb.device, emb.dtype).expand_as(emb)
    v = velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([emb, null]))
    v_cls, v_null = v[:b], v[b:]
    return v_null + guidance * (v_cls - v_null)


@torch.no_grad()
def sample(model, noise: torch.Tensor, emb: torch.Tensor, steps: int, shift: float = SAMPLE_SHIFT,
           batch_size: int = 8, *, guidance: float = 1.0, null: torch.Tensor | None = None) -> torch.Tensor:
    """Euler flow-matching sampler (slaconv.flow) from fixed noise, optionally guided; fp32 videos."""
    outs = []
    for i in range(0, noise.shape[0], batch_size):
        e = emb[i : i + batch_size]
        outs.append(flow.euler_sample(lambda x, t, e=e: guided_velocity(model, x, t / 1000.0, e, null, guidance),
                                      noise[i : i + batch_size].float(), steps, shift))
    return torch.cat(outs)


def release_freed_memory() -> None:
    """Hand memory that freed CPU tensors left in glibc's heap back to the system (``malloc_trim``; a no-op
    elsewhere).  Studies that build and drop N x N maps per sample otherwise keep growing: glibc raises its mmap
    threshold after the first large frees, so later maps come from a heap it rarely returns."""
    if platform.system() != "Linux":
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def file_mb(folder: Path) -> float:
    """Size of the folder's safetensors files in MiB."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def write_json(path: Path, data) -> None:
    """Indented JSON, written atomically (the folder is created; values JSON lacks are written as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


class Timer:
    """Seconds since construction, on each call."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def env_summary() -> dict:
    """Versions, GPU name and thread count of this run, for results files."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    info["cpu_threads"] = torch.get_num_threads()
    info["host"] = os.uname().nodename if hasattr(os, "uname") else ""
    return info
