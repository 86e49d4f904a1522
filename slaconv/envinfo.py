"""What a bug report needs to know about this machine: versions, GPUs, the attention backend slaconv
would pick here, and the environment variables that change its behaviour (``slaconv env``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import warnings

from . import __version__

# report key -> distribution name
PACKAGES = {
    "torch": "torch",
    "triton": "triton",
    "diffusers": "diffusers",
    "accelerate": "accelerate",
    "huggingface_hub": "huggingface-hub",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "kernels": "kernels",
}
ENV_VARS = ("SLACONV_BACKEND", "TRITON_INTERPRET", "HF_HUB_OFFLINE", "HF_HOME", "CUDA_VISIBLE_DEVICES")
# a head dim the Triton kernels do not take, to show where the reference runs instead
OTHER_HEAD_DIM = 96


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in :data:`PACKAGES` (``None`` where it is not installed)."""
    out: dict[str, str | None] = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def gpu_info() -> dict:
    """torch's CUDA build, whether CUDA is usable, and each visible GPU's name and compute capability."""
    try:
        import torch
    except ImportError:
        return {"torch_cuda_build": None, "cuda_available": False, "gpus": []}
    available = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if available else 0):
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                     "compute_capability": f"{major}.{minor}"})
    return {"torch_cuda_build": torch.version.cuda, "cuda_available": available, "gpus": gpus}


def attention_backends(device: str) -> dict[str, str]:
    """The backend :func:`slaconv.kernels.ops.choose_backend` picks on ``device`` for each kernel head dim
    and for other head dims, honouring ``SLACONV_BACKEND``; a backend that cannot run reads ``error: ...``."""
    import torch

    from .config import KERNEL_HEAD_DIMS
    from .kernels.ops import choose_backend

    out = {}
    for head_dim in (*KERNEL_HEAD_DIMS, OTHER_HEAD_DIM):
        key = f"head_dim_{head_dim}" if head_dim in KERNEL_HEAD_DIMS else "other_head_dims"
        q = torch.empty(1, 1, 1, head_dim, device=device)
        try:
            with warnings.catch_warnings():  # the reference-on-GPU warning is what this reports
                warnings.simplefilter("ignore")
                out[key] = choose_backend(q, soft=False, partial=False)
        except (RuntimeError, ImportError) as exc:
            out[key] = f"error: {exc}"
    return out


def collect() -> dict:
    """Everything ``slaconv env`` reports, as a JSON-ready dict."""
    gpu = gpu_info()
    device = "cuda" if gpu["cuda_available"] else "cpu"
    try:
        backends = attention_backends(device)
    except ImportError as exc:
        backends = {"error": str(exc)}
    return {
        "slaconv": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        **gpu,
        "attention_backend": {"device": device, **backends},
        "env": {name: os.environ.get(name) for name in ENV_VARS},
    }


def render(info: dict) -> str:
    """The human-readable form of :func:`collect`'s dict, one ``name  value`` pair per line."""
    rows = [("slaconv", info["slaconv"]), ("python", info["python"]), ("executable", info["executable"]),
            ("platform", info["platform"])]
    for key, version in info["packages"].items():
        if key == "torch" and version is not None:
            version += f" (CUDA build: {info['torch_cuda_build'] or 'none'})"
        rows.append((key, version or "not installed"))
    rows.append(("CUDA available", "yes" if info["cuda_available"] else "no"))
    for gpu in info["gpus"]:
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']} (compute capability {gpu['compute_capability']})"))
    backend = dict(info["attention_backend"])
    device = backend.pop("device")
    for key, value in backend.items():
        rows.append((f"backend {key.replace('_', ' ')}", f"{value} (on {device})"))
    for name, value in info["env"].items():
        rows.append((name, "(unset)" if value is None else value))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
