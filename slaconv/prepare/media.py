"""Opening media (images, animations, frame folders, videos), probing them, and fitting their frames.

Each item becomes ``num_frames`` RGB frames:

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
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..utils.messages import first_line

if TYPE_CHECKING:
    from .captions import Item

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"})


def natural_key(name: str):
    """Sort key comparing the digit runs of ``name`` as numbers (``frame_2`` before ``frame_10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, in natural order (hidden files skipped)."""
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: natural_key(p.name))


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
        for f in frame_files(item.path):
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
        files = frame_files(item.path)
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
