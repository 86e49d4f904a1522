"""The ``slaconv prepare`` driver: check every input, encode captions then media, write the dataset.

The text encoder is loaded, used and freed before the VAE is loaded, so only one model is in memory
at a time; encoded samples are spilled to a scratch folder beside ``OUT`` (removed afterwards) and
the dataset is written atomically with :func:`slaconv.data.write_dataset`.  The text encoder runs in
batches of ``TEXT_BATCH``.  Identical captions, and the same media file listed twice (several
captions per clip), are encoded once.  Inputs are never modified.  ``seed`` is recorded in the
manifest; the encoding itself involves no randomness.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InputError, OutOfMemoryError, OutputExistsError, UsageError
from ..progress import progress
from ..utils.devices import DTYPES, release_memory, resolve_device
from ..utils.messages import looks_local
from .captions import read_captions
from .encoding import encode_prompts, encode_video
from .media import load_video, probe
from .pipeline import (
    check_pipeline,
    check_sizes,
    latent_stats,
    library_progress_bars,
    load_text_encoder,
    load_vae,
    resolve_pipeline,
    vae_factors,
)

GENERATOR = "slaconv.prepare/1"
TEXT_BATCH = 8
STORE_DTYPES = ("float32", "bfloat16")  # the --dtype choices of prepare (a subset of DTYPES)


class _SpilledSamples(Sequence):
    """Samples stored one safetensors file each in a scratch folder, read back on access."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        from safetensors.torch import load_file

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return load_file(str(self.files[index]))


def _output_is_free(out: Path) -> bool:
    return not (out.exists() and (not out.is_dir() or any(out.iterdir())))


def _check_output(out: Path) -> None:
    if not _output_is_free(out):
        raise OutputExistsError(f"{out} already exists and is not empty; choose another directory or remove it")


def plan(out_dir, *, pipeline: str, captions, media_dir=None, height: int, width: int, num_frames: int,
         max_sequence_length: int = 512, revision: str | None = None, offline: bool = False, **_) -> dict:
    """What ``prepare_dataset`` would do, checking inputs (captions, media headers, pipeline configs)."""
    items = read_captions(captions, media_dir)
    root, rev = resolve_pipeline(pipeline, revision=revision, offline=offline, configs_only=True)
    info = check_pipeline(root, weights=looks_local(pipeline))  # a Hub dry run fetched configs only
    check_sizes(info["vae"], height=height, width=width, num_frames=num_frames,
                max_sequence_length=max_sequence_length)
    spatial, temporal = vae_factors(info["vae"])
    rows = []
    for item in items:
        p = probe(item)
        rows.append({"file": item.label, "path": str(item.path), "kind": p["kind"], "frames": p["frames"],
                     "caption": item.caption})
    out = Path(out_dir)
    return {
        "output": str(out), "output_ok": _output_is_free(out),
        "pipeline": pipeline, "revision": rev, "num_samples": len(items),
        "latent_shape": [info["vae"].get("z_dim"), (num_frames - 1) // temporal + 1, height // spatial,
                         width // spatial],
        "text_shape": [max_sequence_length, info["text_encoder"].get("d_model")],
        "text_encoder": info["text_encoder_class"], "items": rows,
    }


def prepare_dataset(out_dir: str | os.PathLike, *, pipeline: str, captions: str | os.PathLike,
                    media_dir: str | os.PathLike | None = None, height: int, width: int, num_frames: int,
                    max_sequence_length: int = 512, device: str = "cpu", dtype: str = "float32",
                    revision: str | None = None, seed: int = 0, show_progress: bool = True,
                    offline: bool = False) -> dict:
    """Encode media + captions with a Wan pipeline's VAE and text encoder into a ``--data`` folder.

    Returns a summary dict (``data_dir``, ``num_samples``, shapes, dtype, pipeline, revision).  All
    inputs are checked (captions parsed, media found and their headers read, pipeline folders and
    sizes checked, ``out_dir`` empty) before any model is loaded.
    """
    if dtype not in STORE_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"--seed must be an integer, got {seed!r}")
    store_dtype = DTYPES[dtype]
    out = Path(out_dir)
    check_sizes(None, height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length)
    _check_output(out)
    items = read_captions(captions, media_dir)
    probes = [probe(item) for item in items]
    for item, p in zip(items, probes):
        if p["frames"] is not None and 1 < p["frames"] < num_frames:
            raise InputError(f"{item.path}: has {p['frames']} frames but --num-frames is {num_frames} "
                             "(clips are not padded; lower --num-frames)")
    root, rev = resolve_pipeline(pipeline, revision=revision, offline=offline)
    info = check_pipeline(root)
    check_sizes(info["vae"], height=height, width=width, num_frames=num_frames,
                max_sequence_length=max_sequence_length)
    mean, inv_std = latent_stats(info["vae"], root)
    dev = resolve_device(device)
    bars = show_progress and sys.stderr.isatty()
    from safetensors.torch import load_file

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        with library_progress_bars(bars), _oom_as_error(dev):
            # 1) captions -> prompt_embeds (unique captions once, batched), then free the encoder.
            unique = list(dict.fromkeys(item.caption for item in items))
            tokenizer, encoder = load_text_encoder(root, info["text_encoder_class"], dtype=store_dtype, device=dev)
            text_files = {}
            batches = [unique[i:i + TEXT_BATCH] for i in range(0, len(unique), TEXT_BATCH)]
            for batch in progress(batches, desc="encoding captions", enabled=show_progress):
                embeds = encode_prompts(tokenizer, encoder, batch, max_sequence_length=max_sequence_length,
                                        device=dev, dtype=store_dtype)
                for caption, e in zip(batch, embeds):
                    text_files[caption] = _spill(scratch / f"text_{len(text_files):05d}.safetensors",
                                                 {"prompt_embeds": e.to(store_dtype)})
            del tokenizer, encoder
            release_memory(dev)

            # 2) media -> latents, one sample file each.
            vae = load_vae(root, device=dev)
            sample_files, records, seen = [], [], {}
            for i, item in enumerate(progress(items, desc="encoding media", enabled=show_progress)):
                key = item.path.resolve()
                if key in seen:  # the same media under another caption: encode it once
                    first, meta = seen[key]
                    latents = load_file(str(first))["latents"]
                else:
                    video, meta = load_video(item, num_frames=num_frames, height=height, width=width)
                    latents = encode_video(vae, video, mean, inv_std, device=dev).to(store_dtype)
                    seen[key] = (scratch / f"sample_{i:05d}.safetensors", meta)
                text = load_file(str(text_files[item.caption]))["prompt_embeds"]
                sample_files.append(_spill(scratch / f"sample_{i:05d}.safetensors",
                                           {"latents": latents, "prompt_embeds": text}))
                records.append({"file": item.label, "caption": item.caption, **meta})
            del vae
            release_memory(dev)

        extra = {"generator": GENERATOR, "pipeline": str(pipeline), "revision": rev, "height": height,
                 "width": width, "num_frames": num_frames, "max_sequence_length": max_sequence_length,
                 "latents": "vae posterior mode, (z - latents_mean) / latents_std",
                 "items": records}
        from ..data import write_dataset

        path = write_dataset(out, _SpilledSamples(sample_files), source="prepare", seed=seed, extra=extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from ..data import CalibrationDataset

    ds = CalibrationDataset(path)
    return {"data_dir": str(path), "num_samples": len(ds), "latent_shape": list(ds.latent_shape),
            "text_shape": list(ds.text_shape), "dtype": dtype, "pipeline": str(pipeline), "revision": rev,
            "device": dev, "seed": seed}


def _spill(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return path


@contextlib.contextmanager
def _oom_as_error(device: str):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemoryError(f"out of GPU memory on {device} while preparing data; lower --height/--width/"
                               "--num-frames, use --dtype bfloat16, or --device cpu") from None
