"""``slaconv prepare``: build a ``--data`` folder from media + captions with a Wan pipeline's VAE and T5.

Only three components of a diffusers Wan pipeline are read: ``vae/`` (``AutoencoderKLWan``),
``text_encoder/`` (``UMT5EncoderModel`` or ``T5EncoderModel``) and ``tokenizer/``; never the
transformer.  Weights are read from safetensors only (``use_safetensors=True``): nothing is unpickled.
A Hub id downloads just those folders plus ``model_index.json``.

Captions (``--captions``), one of:

* a ``.jsonl`` file, one ``{"file": "clip.mp4", "caption": "..."}`` object per line;
* a ``.csv`` file with a header holding ``file`` and ``caption`` columns;
* a folder of media, each with a same-named ``.txt`` caption (``cat.png`` + ``cat.txt``; a
  sub-folder of frames ``walk/`` + ``walk.txt``).

Relative ``file`` entries are looked up in ``--media-dir`` (default: the captions file's folder).

Media, each turned into ``num_frames`` RGB frames:

* still images (png, jpg, webp, bmp, ...; anything Pillow reads as one frame): the image is repeated
  to ``num_frames`` frames (a still video), so stills and clips mix in one dataset of one shape.
  With ``--num-frames 1`` an image is encoded as a single frame, exactly as Wan encodes images (its
  causal VAE encodes the first frame on its own).
* animated images (GIF, animated WebP/PNG) and folders of frame images (sorted by name, numbers
  compared as numbers): the first ``num_frames`` frames.
* videos (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``): the first ``num_frames`` frames, read with
  PyAV (``pip install av``) or, failing that, imageio; neither is a dependency of slaconv.

A clip with more than one but fewer than ``num_frames`` frames is an error (never padded).  Every
frame is turned upright by its EXIF orientation (if any), centre-cropped to the target aspect ratio,
resized to ``height x width`` (Lanczos), and scaled to [-1, 1].

Encoding, matching diffusers' ``WanPipeline``:

* latents: ``vae.encode(video).latent_dist.mode()`` (the posterior mean, as Wan's own VAE ``encode``
  and diffusers' Wan I2V pipeline (``sample_mode="argmax"``) use it, so the data is deterministic),
  normalised as ``(z - latents_mean) * (1 / latents_std)``: the exact inverse of the pipeline's decode
  step ``z / (1 / latents_std) + latents_mean``.  Stored as ``latents[0]``: (C, F', H', W') with
  F' = (F - 1) / 4 + 1 and H' = H / 8 for Wan2.1's VAE.  The VAE always runs in float32.
* prompt_embeds: ``WanPipeline._get_t5_prompt_embeds``: the prompt cleaned the same way (ftfy if
  installed, HTML unescape, whitespace collapsed), tokenised with ``padding="max_length"``,
  ``truncation=True``, the encoder's last hidden state computed with the attention mask, then every
  position past the real tokens (including their ``</s>``) set to exactly zero: (max_sequence_length, D).
  The text encoder runs in batches of ``TEXT_BATCH``.  Identical captions, and the same media file
  listed twice (several captions per clip), are encoded once.

The text encoder is loaded, used and freed before the VAE is loaded, so only one model is in memory
at a time; encoded samples are spilled to a scratch folder beside ``OUT`` (removed afterwards) and
the dataset is written atomically with :func:`slaconv.data.write_dataset`.  Inputs are never
modified.  ``seed`` is recorded in the manifest; the encoding itself involves no randomness.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InputError, OutOfMemoryError, OutputExistsError, UsageError
from .utils.devices import DTYPES, release_memory, resolve_device
from .utils.files import read_json
from .utils.messages import first_line, looks_local

GENERATOR = "slaconv.prepare/1"
TEXT_BATCH = 8
COMPONENTS = ("vae", "text_encoder", "tokenizer")
TEXT_ENCODER_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")
_TEXT_ENCODER_BY_TYPE = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"})
STORE_DTYPES = ("float32", "bfloat16")  # the --dtype choices of prepare (a subset of DTYPES)
# Hub download: configs, safetensors weights (+ shard indexes) and tokenizer files; never *.bin / *.pt.
HUB_PATTERNS = [
    "model_index.json",
    "vae/config.json", "vae/*.safetensors", "vae/*.safetensors.index.json",
    "text_encoder/config.json", "text_encoder/*.safetensors", "text_encoder/*.safetensors.index.json",
    "tokenizer/*.json", "tokenizer/*.model", "tokenizer/*.txt",
]
HUB_CONFIG_PATTERNS = ["model_index.json", "vae/config.json", "text_encoder/config.json",
                       "tokenizer/tokenizer_config.json"]


# ------------------------------------------------------------------------------------ captions


@dataclass(frozen=True)
class Item:
    """One sample to encode: a media path (file or frame folder), how it was named, its caption."""

    path: Path
    label: str       # the name as written in the captions (for messages and the manifest)
    caption: str
    where: str       # "captions.jsonl:3" or the .txt file, for messages

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "frames"
        return "video" if self.path.suffix.lower() in VIDEO_EXTS else "image"


def _check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise InputError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise InputError(f"{where}: caption is empty")
    return caption


def _media_item(file: Any, caption: Any, media_dir: Path, where: str) -> Item:
    if not isinstance(file, str) or not file.strip():
        raise InputError(f"{where}: 'file' must be a non-empty string, got {file!r}")
    caption = _check_caption(caption, where)
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = media_dir / path
    if not path.exists():
        raise InputError(f"{where}: media file not found: {path}")
    return Item(path, file, caption, where)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({first_line(exc)})") from None


def _read_jsonl(path: Path, media_dir: Path) -> list[Item]:
    items = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: each line must be a JSON object with 'file' and 'caption'")
        missing = [k for k in ("file", "caption") if k not in row]
        if missing:
            raise InputError(f"{where}: missing key(s) {', '.join(missing)} (each line needs 'file' and 'caption')")
        items.append(_media_item(row["file"], row["caption"], media_dir, where))
    return items


def _read_csv(path: Path, media_dir: Path) -> list[Item]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
        header = reader.fieldnames or []
        if not {"file", "caption"} <= {h.strip() for h in header}:
            raise InputError(f"{path}:1: the header must name 'file' and 'caption' columns, got {header}")
        items = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            row = {k.strip(): v for k, v in row.items() if k is not None}  # None: surplus cells
            if row.get("file") is None or row.get("caption") is None:
                raise InputError(f"{where}: row has too few columns (needs file and caption)")
            if all(not (v or "").strip() for k, v in row.items() if k):
                continue  # blank line
            items.append(_media_item(row["file"], row["caption"], media_dir, where))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({first_line(exc)})") from None
    return items


def _is_media(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(_frame_files(path))
    return path.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS


def _read_folder(folder: Path) -> list[Item]:
    items = []
    for path in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if not _is_media(path):
            continue
        txt = path.with_suffix(".txt") if path.is_file() else path.with_name(path.name + ".txt")
        if not txt.is_file():
            raise InputError(f"{path}: no caption file {txt.name} beside it (each media file needs a same-named .txt)")
        items.append(Item(path, path.name, _check_caption(_read_text(txt).strip(), str(txt)), str(txt)))
    return items


def read_captions(captions: str | os.PathLike, media_dir: str | os.PathLike | None = None) -> list[Item]:
    """Parse a captions JSONL/CSV file or a captioned media folder; check every media path exists."""
    path = Path(captions).expanduser()
    if not path.exists():
        raise InputError(f"captions not found: {path}")
    if path.is_dir():
        if media_dir is not None and Path(media_dir).resolve() != path.resolve():
            raise UsageError("--media-dir applies to a JSONL or CSV captions file, not a captions folder")
        items = _read_folder(path)
    else:
        base = Path(media_dir).expanduser() if media_dir is not None else path.parent
        if media_dir is not None and not base.is_dir():
            raise InputError(f"media directory not found: {base}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            items = _read_jsonl(path, base)
        elif suffix == ".csv":
            items = _read_csv(path, base)
        else:
            raise InputError(f"{path}: captions must be a .jsonl file, a .csv file, or a folder of media + .txt files")
    if not items:
        raise InputError(f"{path}: no media with captions found")
    return items


# --------------------------------------------------------------------------------------- media


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({first_line(exc)})") from None


def _video_reader():
    """(name, module) of an importable video decoder, or None."""
    try:
        import av

        return "av", av
    except ImportError:
        pass
    try:
        import imageio.v3 as iio

        return "imageio", iio
    except ImportError:
        return None


def _need_video_reader(path: Path):
    reader = _video_reader()
    if reader is None:
        raise InputError(f"{path}: reading {path.suffix} video needs PyAV (pip install av) or imageio "
                         "(pip install imageio[pyav]); neither is installed. Images, GIFs and frame folders "
                         "need neither")
    return reader


def _iter_video(path: Path) -> Iterator:
    from PIL import Image

    name, mod = _need_video_reader(path)
    try:
        if name == "av":
            with mod.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{path}: holds no video stream")
                for frame in container.decode(container.streams.video[0]):
                    yield frame.to_image()
        else:
            for array in mod.imiter(path):
                yield Image.fromarray(array)
    except InputError:
        raise
    except Exception as exc:  # decoder errors of every flavour
        raise InputError(f"{path}: cannot decode video ({first_line(exc)})") from None


def _iter_frames(item: Item) -> Iterator:
    """PIL frames of a media item, in order (lazily; the caller stops after what it needs)."""
    from PIL import ImageSequence

    if item.kind == "video":
        yield from _iter_video(item.path)
    elif item.kind == "frames":
        for f in _frame_files(item.path):
            with _open_image(f) as img:
                yield _loaded(img, f)
    else:
        with _open_image(item.path) as img:
            for frame in ImageSequence.Iterator(img):
                yield _loaded(frame, item.path)


def _loaded(img, path: Path):
    from PIL import ImageOps

    try:
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation (phone photos): upright first
            img = ImageOps.exif_transpose(img)
        return img.convert("RGB")  # decodes; composites palette / alpha / GIF disposal
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot decode image ({first_line(exc)})") from None


def probe(item: Item) -> dict:
    """Cheap check that a media item is readable, and its frame count when known (headers only)."""
    if item.kind == "video":
        name, mod = _need_video_reader(item.path)
        frames = None
        if name == "av":
            try:
                with mod.open(str(item.path)) as c:
                    if not c.streams.video:
                        raise InputError(f"{item.path}: holds no video stream")
                    frames = int(c.streams.video[0].frames) or None
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{item.path}: cannot open video ({first_line(exc)})") from None
        return {"kind": "video", "frames": frames}
    if item.kind == "frames":
        files = _frame_files(item.path)
        if not files:
            raise InputError(f"{item.path}: frame folder holds no images")
        with _open_image(files[0]):
            pass
        return {"kind": "frames", "frames": len(files)}
    with _open_image(item.path) as img:
        return {"kind": "image", "frames": int(getattr(img, "n_frames", 1))}


def fit_frame(img, height: int, width: int):
    """Centre-crop a PIL image to ``width/height``'s aspect ratio, then resize to exactly that."""
    from PIL import Image

    w, h = img.size
    if w * height > h * width:  # too wide: crop the sides
        cw, ch = max(1, round(h * width / height)), h
    else:                        # too tall: crop top and bottom
        cw, ch = w, max(1, round(w * height / width))
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return img


def load_video(item: Item, *, num_frames: int, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """(3, F, H, W) float32 in [-1, 1], and {"frames": source frames used, "still": bool}."""
    import numpy as np

    frames = []
    for frame in _iter_frames(item):
        frames.append(fit_frame(frame, height, width))
        if len(frames) == num_frames:
            break
    if not frames:
        raise InputError(f"{item.path}: no frames")
    still = len(frames) == 1
    if len(frames) < num_frames and not still:
        raise InputError(f"{item.path}: has {len(frames)} frames but --num-frames is {num_frames} "
                         "(clips are not padded; lower --num-frames)")
    arrays = [np.asarray(f, dtype=np.uint8) for f in frames]
    video = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2).float()  # (3, n, H, W)
    if still and num_frames > 1:
        video = video.expand(-1, num_frames, -1, -1)
    return (video / 127.5 - 1.0).contiguous(), {"frames": len(frames), "still": still}


# ------------------------------------------------------------------------------------ pipeline


def resolve_pipeline(pipeline: str, *, revision: str | None = None, offline: bool = False,
                     configs_only: bool = False) -> tuple[Path, str | None]:
    """Local folder or Hub id -> (local pipeline folder, revision); downloads only what prepare reads."""
    if looks_local(pipeline):
        root = Path(pipeline).expanduser()
        if not root.exists():
            raise InputError(f"pipeline path does not exist: {pipeline}")
        if not root.is_dir():
            raise InputError(f"pipeline path is not a folder: {pipeline}")
        return root, None  # a local folder has no Hub revision
    from .hubfetch import fetch_snapshot

    snapshot = fetch_snapshot(pipeline, revision=revision, offline=offline, what="pipeline",
                              allow_patterns=HUB_CONFIG_PATTERNS if configs_only else HUB_PATTERNS)
    return snapshot, snapshot.name


def check_pipeline(root: Path, *, weights: bool = True) -> dict:
    """Check the vae/, text_encoder/, tokenizer/ folders; return {"vae": cfg, "text_encoder": cfg, ...}."""
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        hint = " (this looks like a single model folder, not a pipeline)" if (root / "config.json").is_file() else ""
        raise InputError(f"{root} is not a diffusers Wan pipeline folder: no {', '.join(m + '/' for m in missing)}"
                         f"{hint}")
    info: dict[str, Any] = {}
    for comp in ("vae", "text_encoder"):
        cfg_path = root / comp / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{root / comp}: no config.json")
        if weights and not any((root / comp).glob("*.safetensors")):
            raise InputError(f"{root / comp} holds no .safetensors weights (pickled checkpoints are not read)")
        info[comp] = read_json(cfg_path)
    vae = info["vae"]
    if vae.get("_class_name") != "AutoencoderKLWan":
        raise InputError(f"{root / 'vae'}: is {vae.get('_class_name')!r}, expected 'AutoencoderKLWan' (a Wan pipeline)")
    info["text_encoder_class"] = _text_encoder_class(root, info["text_encoder"])
    return info


def _text_encoder_class(root: Path, cfg: dict) -> str:
    names = list(cfg.get("architectures") or [])
    index = root / "model_index.json"
    if index.is_file():
        entry = read_json(index).get("text_encoder")
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            names.insert(0, entry[1])
    for name in names:
        if name in TEXT_ENCODER_CLASSES:
            return name
    by_type = _TEXT_ENCODER_BY_TYPE.get(cfg.get("model_type"))
    if by_type:
        return by_type
    raise InputError(f"{root / 'text_encoder'}: expected a UMT5/T5 encoder, got "
                     f"{names or cfg.get('model_type')!r}")


def _vae_factors(vae_cfg: dict) -> tuple[int, int]:
    return int(vae_cfg.get("scale_factor_spatial") or 8), int(vae_cfg.get("scale_factor_temporal") or 4)


def _check_sizes(vae_cfg: dict | None, *, height, width, num_frames, max_sequence_length) -> None:
    spatial, temporal = _vae_factors(vae_cfg or {})
    multiple = max(16, spatial)
    for name, v in (("height", height), ("width", width)):
        if not (isinstance(v, int) and v > 0 and v % multiple == 0):
            raise UsageError(f"--{name} must be a positive multiple of {multiple} (WanPipeline's rule), got {v}")
    if not (isinstance(num_frames, int) and num_frames > 0 and (num_frames - 1) % temporal == 0):
        raise UsageError(f"--num-frames must be {temporal}k+1 (1, 5, ..., 81), got {num_frames}")
    if not (isinstance(max_sequence_length, int) and max_sequence_length > 0):
        raise UsageError(f"--max-sequence-length must be a positive integer, got {max_sequence_length}")


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """Silence transformers' / diffusers' own loading bars unless ours are on."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as dlog

    libs = [dlog]
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog

        libs.append(tlog)
    was = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libs, was):
            if on:
                lib.enable_progress_bar()


def load_text_encoder(root: Path, class_name: str, *, dtype: torch.dtype, device):
    try:
        import transformers
    except ImportError:
        raise InputError("slaconv prepare needs transformers for the text encoder: pip install transformers") from None
    cls = getattr(transformers, class_name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    except Exception as exc:
        raise InputError(f"could not load the tokenizer from {root / 'tokenizer'}: {first_line(exc)}") from None
    try:
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        encoder = cls.from_pretrained(root / "text_encoder", use_safetensors=True, **{dtype_kw: dtype})
    except Exception as exc:
        raise InputError(f"could not load {root / 'text_encoder'} as {class_name}: {first_line(exc)}") from None
    return tokenizer, encoder.to(device).eval()


def load_vae(root: Path, *, device):
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32, use_safetensors=True)
    except Exception as exc:
        raise InputError(f"could not load {root / 'vae'} as AutoencoderKLWan: {first_line(exc)}") from None
    return vae.to(device).eval()


def _latent_stats(vae_cfg: dict, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae_cfg.get("z_dim")
    mean, std = vae_cfg.get("latents_mean"), vae_cfg.get("latents_std")
    for name, v in (("latents_mean", mean), ("latents_std", std)):
        if not (isinstance(v, list) and len(v) == z):
            raise InputError(f"{root / 'vae' / 'config.json'}: {name} must list z_dim={z} values, "
                             f"got {len(v) if isinstance(v, list) else v!r}")
    if any(s == 0 for s in std):
        raise InputError(f"{root / 'vae' / 'config.json'}: latents_std holds a zero")
    return torch.tensor(mean).view(1, z, 1, 1, 1), 1.0 / torch.tensor(std).view(1, z, 1, 1, 1)


# ------------------------------------------------------------------------------------ encoding


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (if installed), HTML unescape twice, whitespace collapsed."""
    try:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_clean

        return wan_clean(text)
    except ImportError:  # pragma: no cover - the same thing, for a diffusers that moved it
        from diffusers.utils import is_ftfy_available

        if is_ftfy_available():
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts: list[str], *, max_sequence_length: int, device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, max_sequence_length, D), exactly ``WanPipeline._get_t5_prompt_embeds`` (zeros after the tokens)."""
    prompts = [prompt_clean(p) for p in prompts]
    inputs = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = inputs.input_ids, inputs.attention_mask
    seq_lens = mask.gt(0).sum(dim=1).long()
    embeds = encoder(ids.to(device), mask.to(device)).last_hidden_state.to(dtype=dtype)
    embeds = [u[:v] for u, v in zip(embeds, seq_lens)]
    return torch.stack([torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in embeds])


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, *, device) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> normalised latents (C, F', H', W'), float32 on the CPU."""
    z = vae.encode(video.unsqueeze(0).to(device, torch.float32)).latent_dist.mode()
    z = (z - mean.to(z.device, z.dtype)) * inv_std.to(z.device, z.dtype)
    return z[0].float().cpu()


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


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose another directory or remove it")


def _progress(iterable, *, desc: str, enabled: bool, total: int | None = None):
    from .progress import progress

    return progress(iterable, desc=desc, enabled=enabled, total=total)


def plan(out_dir, *, pipeline: str, captions, media_dir=None, height: int, width: int, num_frames: int,
         max_sequence_length: int = 512, revision: str | None = None, offline: bool = False, **_) -> dict:
    """What ``prepare_dataset`` would do, checking inputs (captions, media headers, pipeline configs)."""
    items = read_captions(captions, media_dir)
    root, rev = resolve_pipeline(pipeline, revision=revision, offline=offline, configs_only=True)
    info = check_pipeline(root, weights=looks_local(pipeline))  # a Hub dry run fetched configs only
    _check_sizes(info["vae"], height=height, width=width, num_frames=num_frames,
                 max_sequence_length=max_sequence_length)
    spatial, temporal = _vae_factors(info["vae"])
    rows = []
    for item in items:
        p = probe(item)
        rows.append({"file": item.label, "path": str(item.path), "kind": p["kind"], "frames": p["frames"],
                     "caption": item.caption})
    out = Path(out_dir)
    return {
        "output": str(out), "output_ok": not (out.exists() and (not out.is_dir() or any(out.iterdir()))),
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
    _check_sizes(None, height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length)
    _check_output(out)
    items = read_captions(captions, media_dir)
    probes = [probe(item) for item in items]
    for item, p in zip(items, probes):
        if p["frames"] is not None and 1 < p["frames"] < num_frames:
            raise InputError(f"{item.path}: has {p['frames']} frames but --num-frames is {num_frames} "
                             "(clips are not padded; lower --num-frames)")
    root, rev = resolve_pipeline(pipeline, revision=revision, offline=offline)
    info = check_pipeline(root)
    _check_sizes(info["vae"], height=height, width=width, num_frames=num_frames,
                 max_sequence_length=max_sequence_length)
    mean, inv_std = _latent_stats(info["vae"], root)
    dev = resolve_device(device)
    bars = show_progress and sys.stderr.isatty()
    from safetensors.torch import load_file

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        with _library_bars(bars), _oom_as_error(dev):
            # 1) captions -> prompt_embeds (unique captions once, batched), then free the encoder.
            unique = list(dict.fromkeys(item.caption for item in items))
            tokenizer, encoder = load_text_encoder(root, info["text_encoder_class"], dtype=store_dtype, device=dev)
            text_files = {}
            batches = [unique[i:i + TEXT_BATCH] for i in range(0, len(unique), TEXT_BATCH)]
            for batch in _progress(batches, desc="encoding captions", enabled=show_progress):
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
            for i, item in enumerate(_progress(items, desc="encoding media", enabled=show_progress)):
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
        from .data import write_dataset

        path = write_dataset(out, _SpilledSamples(sample_files), source="prepare", seed=seed, extra=extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from .data import CalibrationDataset

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
