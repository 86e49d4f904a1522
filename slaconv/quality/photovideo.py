"""PhotoVideo: deterministic short videos of camera motion over real photographs.

The glyph videos of :mod:`slaconv.quality.synthvideo` have large flat regions, and a DiT trained on them
attends diffusely (many keys are equally good matches).  Real video models see natural images, whose
fine detail gives each point a few sharp matches.  This generator moves a virtual camera over the
photographs that ship inside scikit-image's wheel (``skimage/data``): pans, zooms, slow rotations and
cross-fades from one photo to another, rendered with bilinear sampling from photos resized once so
that their short side is ``photo_res`` pixels.

The photos are read with Pillow from a folder: ``--photos DIR`` of the commands that take it,
``$SLACONV_PHOTOS``, or the data folder of an installed scikit-image (found without importing it).
``python -m slaconv.quality.photovideo extract DIR`` copies them there from a scikit-image wheel.

Held-out videos are really unseen: stream ``heldout_stream`` (the benchmark's held-out stream) draws
only from ``heldout_photos``, every other stream only from ``train_photos``.

Conditioning: a "caption" of four (text_dim,) tokens, two seeded vectors naming the photo and two
naming the motion (the cross-fade's second photo is not named), looked up by label
``photo * len(MOTIONS) + motion``; the all-zero embedding is the unconditional input.

    python -m slaconv.quality.photovideo extract DIR [--wheel WHEEL]
    python -m slaconv.quality.photovideo preview OUT.png [--photos DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slaconv.errors import InputError
from slaconv.quality.render import to_device
from slaconv.quality.specs import SpecMethods

MOTIONS = ("pan left", "pan right", "pan up", "pan down", "zoom in", "zoom out", "turn left", "turn right",
           "cross-fade")
PAN_DIRECTIONS = {"pan left": (-1.0, 0.0), "pan right": (1.0, 0.0), "pan up": (0.0, -1.0), "pan down": (0.0, 1.0)}
GENERATOR_VERSION = "photovideo/1"
PHOTOS_ENV = "SLACONV_PHOTOS"

# Photographs of skimage/data (colour and grey; drawings, masks and tiny test images left out).
TRAIN_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
                "text.png")
HELDOUT_PHOTOS = ("rocket.jpg", "retina.jpg", "cell.png", "clock_motion.png")


@dataclass(frozen=True)
class PhotoSpec(SpecMethods):
    """Shape and content settings of a PhotoVideo stream (everything a sample depends on, with the seed)."""

    source: str = "photos"  # tells a saved spec from a SynthVideo one
    frames: int = 8
    size: int = 64  # H = W in pixels
    channels: int = 3  # RGB
    photo_res: int = 192  # short side of every photo after resizing, in pixels
    train_photos: tuple[str, ...] = TRAIN_PHOTOS
    heldout_photos: tuple[str, ...] = HELDOUT_PHOTOS
    heldout_stream: int = 1
    min_zoom: float = 1.0  # photo pixels per video pixel
    max_zoom: float = 1.5
    min_speed: float = 0.5  # pan speed, video pixels per frame
    max_speed: float = 2.0
    zoom_change: float = 0.3  # zoom in / out: total change of the zoom over the video (factor 1 +- this)
    max_turn: float = 0.03  # turn: radians per frame (at least a third of it)
    text_len: int = 4
    text_dim: int = 32
    embed_seed: int = 4321

    def __post_init__(self):
        object.__setattr__(self, "train_photos", tuple(self.train_photos))
        object.__setattr__(self, "heldout_photos", tuple(self.heldout_photos))
        if set(self.train_photos) & set(self.heldout_photos):
            raise ValueError(f"photos both trained on and held out: {set(self.train_photos) & set(self.heldout_photos)}")
        if not self.train_photos or not self.heldout_photos:
            raise ValueError("PhotoSpec needs at least one training and one held-out photo")
        if self.photo_res < math.ceil(self.size * self.max_zoom * math.sqrt(2)) + 2:
            raise ValueError(f"photo_res {self.photo_res} is too small for {self.size}-pixel frames at zoom "
                             f"{self.max_zoom}")

    @property
    def photos(self) -> tuple[str, ...]:
        """All photos, training ones first; a photo's index here is its conditioning index."""
        return self.train_photos + self.heldout_photos

    @property
    def num_classes(self) -> int:
        """Number of (photo, motion) conditions."""
        return len(self.photos) * len(MOTIONS)

    def pool(self, seed: int) -> tuple[str, ...]:
        """The photos stream ``seed`` draws from."""
        return self.heldout_photos if seed == self.heldout_stream else self.train_photos



SMOKE_PHOTO_SPEC = PhotoSpec(frames=4, size=32, photo_res=96)


# ------------------------------------------------------------------------------------------ photos


def skimage_data_dir() -> Path | None:
    """scikit-image's data folder, if the package is installed (found without importing it)."""
    found = importlib.util.find_spec("skimage")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / "data"


def photo_dir(explicit: str | Path | None = None) -> Path:
    """The folder photos are read from: ``explicit``, else $SLACONV_PHOTOS, else scikit-image's data folder."""
    for candidate in (explicit, os.environ.get(PHOTOS_ENV) or None, skimage_data_dir()):
        if candidate is not None:
            return Path(candidate)
    raise InputError(f"no photo folder: pass --photos DIR or set {PHOTOS_ENV} "
                     "(python -m slaconv.quality.photovideo extract DIR copies the photos out of a scikit-image wheel)")


_CACHE: dict[tuple, torch.Tensor] = {}


def load_photo(folder: Path, name: str, short_side: int) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: the photo as RGB, resized (Lanczos) so its short side is ``short_side``."""
    from PIL import Image

    path = Path(folder) / name
    key = (str(path), short_side)
    if key not in _CACHE:
        if not path.is_file():
            raise InputError(f"photo {path} not found (python -m slaconv.quality.photovideo extract {folder})")
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = short_side / min(im.size)
            im = im.resize((max(short_side, round(im.size[0] * scale)), max(short_side, round(im.size[1] * scale))),
                           Image.Resampling.LANCZOS)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
        _CACHE[key] = data.permute(2, 0, 1).float().div(255.0).contiguous()
    return _CACHE[key]


def photo_bank(spec: PhotoSpec, device="cpu", folder: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Every photo of the spec, resized, on ``device``: name -> (3, H, W)."""
    root = photo_dir(folder)
    return {name: load_photo(root, name, spec.photo_res).to(device) for name in spec.photos}


# ------------------------------------------------------------------------------------------ conditioning


def class_embeddings(spec: PhotoSpec) -> torch.Tensor:
    """(num_classes, text_len, text_dim): two seeded tokens per photo, then two per motion (repeated to text_len)."""
    gen = torch.Generator().manual_seed(spec.embed_seed)
    photo_tok = torch.randn(len(spec.photos), 2, spec.text_dim, generator=gen)
    motion_tok = torch.randn(len(MOTIONS), 2, spec.text_dim, generator=gen)
    caption = torch.cat([photo_tok[:, None].expand(-1, len(MOTIONS), -1, -1),
                         motion_tok[None].expand(len(spec.photos), -1, -1, -1)], dim=2)  # (P, M, 4, D)
    caption = caption.reshape(spec.num_classes, 4, spec.text_dim)
    return caption.repeat(1, math.ceil(spec.text_len / 4), 1)[:, : spec.text_len].contiguous()


def null_embedding(spec: PhotoSpec) -> torch.Tensor:
    """(text_len, text_dim) zeros: the unconditional input of classifier-free guidance."""
    return torch.zeros(spec.text_len, spec.text_dim)


def label_name(spec: PhotoSpec, label: int) -> str:
    """A caption for a label, e.g. ``"coffee, zoom in"``."""
    photo, motion = divmod(int(label), len(MOTIONS))
    return f"{spec.photos[photo].rsplit('.', 1)[0]}, {MOTIONS[motion]}"


# ------------------------------------------------------------------------------------------ params


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of stream ``seed`` (a SHA-256 hash of both)."""
    return int.from_bytes(hashlib.sha256(f"photovideo:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@dataclass
class Shot:
    """A camera path over one photo: per frame the window centre (photo pixels), zoom and angle."""

    photo: str
    cx: torch.Tensor  # (F,)
    cy: torch.Tensor
    zoom: torch.Tensor  # photo pixels per video pixel
    angle: torch.Tensor  # radians


@dataclass
class PhotoParams:
    """The random choices of one video: its label, the camera path and, for a cross-fade, the second shot."""

    label: int
    motion: str
    shot: Shot
    fade_to: Shot | None = None
    fade: torch.Tensor = field(default=None)  # (F,) weight of fade_to


def _draw_shot(u, photo: str, hw: tuple[int, int], spec: PhotoSpec, motion: str) -> Shot:
    """A camera path of ``motion`` that keeps every frame's window (rotated or not) inside the photo."""
    h, w = hw
    n = spec.frames
    t = torch.arange(n, dtype=torch.float32)
    z0 = u(spec.min_zoom, spec.max_zoom)
    zoom = torch.full((n,), z0)
    angle = torch.full((n,), 0.0)
    vx = vy = 0.0
    if motion in PAN_DIRECTIONS:
        speed = u(spec.min_speed, spec.max_speed) * z0  # photo pixels per frame
        dx, dy = PAN_DIRECTIONS[motion]
        vx, vy = dx * speed, dy * speed
    elif motion in ("zoom in", "zoom out"):
        change = 1 + spec.zoom_change * u(0.5, 1.0)
        ends = (z0, z0 / change) if motion == "zoom in" else (z0 / change, z0)
        zoom = ends[0] * (ends[1] / ends[0]) ** (t / max(n - 1, 1))
    elif motion in ("turn left", "turn right"):
        omega = u(spec.max_turn / 3, spec.max_turn) * (-1 if motion == "turn left" else 1)
        angle = u(-0.1, 0.1) + omega * t
    reach = float(zoom.max()) * spec.size / 2 * (math.sqrt(2) if motion.startswith("turn") else 1.0) + 1
    span_x, span_y = vx * (n - 1), vy * (n - 1)
    if 2 * reach + abs(span_x) > w - 1 or 2 * reach + abs(span_y) > h - 1:  # a short photo side: slow the pan
        slow = min((w - 1 - 2 * reach) / max(abs(span_x), 1e-9), (h - 1 - 2 * reach) / max(abs(span_y), 1e-9), 1.0)
        span_x, span_y, vx, vy = span_x * slow, span_y * slow, vx * slow, vy * slow
    x0 = u(reach + max(0.0, -span_x), w - 1 - reach - max(0.0, span_x))
    y0 = u(reach + max(0.0, -span_y), h - 1 - reach - max(0.0, span_y))
    return Shot(photo, x0 + vx * t, y0 + vy * t, zoom, angle)


def sample_params(seed: int, index: int, spec: PhotoSpec, sizes: dict[str, tuple[int, int]],
                  label: int | None = None) -> PhotoParams:
    """The random choices of sample ``index`` of stream ``seed``.

    ``sizes`` maps photo name -> (height, width) after resizing.  A requested ``label`` picks photo
    ``label mod len(pool)`` of the stream's pool and motion ``label mod len(MOTIONS)`` (so consecutive
    labels vary both); the returned label is the global condition index of what was drawn.
    """
    g = torch.Generator().manual_seed(sample_seed(seed, index))

    def u(a=0.0, b=1.0):
        return a + (b - a) * float(torch.rand(1, generator=g))

    pool = spec.pool(seed)
    drawn = int(torch.randint(len(pool) * len(MOTIONS), (1,), generator=g))
    if label is None:
        photo, motion = pool[drawn // len(MOTIONS)], MOTIONS[drawn % len(MOTIONS)]
    else:
        photo, motion = pool[int(label) % len(pool)], MOTIONS[int(label) % len(MOTIONS)]
    shot = _draw_shot(u, photo, sizes[photo], spec, motion)
    fade_to, fade = None, torch.zeros(spec.frames)
    if motion == "cross-fade":
        others = [p for p in pool if p != photo] or [photo]
        second = others[int(torch.randint(len(others), (1,), generator=g))]
        shot = _draw_shot(u, photo, sizes[photo], spec, "pan right" if u() < 0.5 else "pan left")
        fade_to = _draw_shot(u, second, sizes[second], spec, "pan right" if u() < 0.5 else "pan left")
        s = torch.arange(spec.frames, dtype=torch.float32) / max(spec.frames - 1, 1)
        fade = s * s * (3 - 2 * s)  # smoothstep
    label_out = spec.photos.index(photo) * len(MOTIONS) + MOTIONS.index(motion)
    return PhotoParams(label=label_out, motion=motion, shot=shot, fade_to=fade_to, fade=fade)


# ------------------------------------------------------------------------------------------ render


def _window_grid(path: torch.Tensor, hw: torch.Tensor, size: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=True) of camera paths: (n, F, size, size, 2).

    ``path`` (4, n, F) holds each frame's window centre x, y (photo pixels), zoom and angle; ``hw`` (n, 2)
    the photo's height and width.  Video pixel (i, j) shows photo point ``c + zoom * R(angle) (j - m, i - m)``
    with ``m = (size - 1) / 2``: a pan of k photo pixels per frame at zoom 1 shifts the content by exactly k.
    """
    off = torch.arange(size, dtype=torch.float32, device=path.device) - (size - 1) / 2
    vv, uu = torch.meshgrid(off, off, indexing="ij")  # (S, S): row offset, column offset
    cx, cy, zoom, ang = (x[..., None, None] for x in path)  # (n, F, 1, 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    px = cx + zoom * (cos * uu - sin * vv)
    py = cy + zoom * (sin * uu + cos * vv)
    h, w = (hw[:, i].view(-1, 1, 1, 1) for i in (0, 1))
    return torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1)


def _sample(photo: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n, 3, F, S, S): bilinear samples of ``photo`` (3, H, W) at ``grid`` (n, F, S, S, 2)."""
    n, f, s = grid.shape[:3]
    out = F.grid_sample(photo.unsqueeze(0).expand(n * f, -1, -1, -1), grid.reshape(n * f, s, s, 2),
                        mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(n, f, 3, s, s).transpose(1, 2)


def render_shot(photo: torch.Tensor, shot: Shot, size: int) -> torch.Tensor:
    """(3, F, size, size): one camera path over ``photo`` (3, H, W)."""
    path = torch.stack([shot.cx, shot.cy, shot.zoom, shot.angle])[:, None].to(photo.device)
    hw = torch.tensor([photo.shape[1:]], dtype=torch.float32, device=photo.device)
    return _sample(photo, _window_grid(path, hw, size))[0]


def render(params: Sequence[PhotoParams], spec: PhotoSpec, bank: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch (B, 3, F, H, W) in [-1, 1] on the bank's device.

    The camera paths go to the device in one non-blocking upload per tensor, and each photo is sampled
    once for all the shots over it (shots sorted by photo), so a GPU batch costs a few kernel launches
    per photo, not per video.
    """
    device = next(iter(bank.values())).device
    shots = [p.shot for p in params]
    fading = [b for b, p in enumerate(params) if p.fade_to is not None]
    shots += [params[b].fade_to for b in fading]
    order = sorted(range(len(shots)), key=lambda i: shots[i].photo)
    sorted_shots = [shots[i] for i in order]
    path = torch.stack([torch.stack([s.cx, s.cy, s.zoom, s.angle]) for s in sorted_shots], dim=1)  # (4, n, F)
    hw = torch.tensor([bank[s.photo].shape[1:] for s in sorted_shots], dtype=torch.float32)
    src = list(range(len(params)))  # where each video's second (fade) shot is; itself when it has none
    for j, b in enumerate(fading):
        src[b] = len(params) + j
    fade = torch.stack([p.fade for p in params])  # (B, F)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    path, hw, fade, inverse, src = (to_device(t, device) for t in (path, hw, fade, inverse, torch.tensor(src)))
    grid = _window_grid(path, hw, spec.size)
    pieces, start = [], 0
    while start < len(sorted_shots):
        name = sorted_shots[start].photo
        stop = start
        while stop < len(sorted_shots) and sorted_shots[stop].photo == name:
            stop += 1
        pieces.append(_sample(bank[name], grid[start:stop]))
        start = stop
    frames = torch.cat(pieces)[inverse]  # (n, 3, F, S, S), back in shot order
    w = fade.view(len(params), 1, -1, 1, 1)
    video = frames[: len(params)] * (1 - w) + frames[src] * w
    return (video.clamp(0, 1) * 2 - 1)[:, : spec.channels].contiguous()


def generate(seed: int, indices: Sequence[int], spec: PhotoSpec, labels: Sequence[int] | None = None,
             device="cpu", bank: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos (B, 3, F, H, W) and global labels (B,) of samples ``indices`` of stream ``seed``."""
    bank = bank if bank is not None else photo_bank(spec, device)
    sizes = {name: tuple(t.shape[1:]) for name, t in bank.items()}
    params = [sample_params(seed, int(i), spec, sizes, None if labels is None else int(labels[j]))
              for j, i in enumerate(indices)]
    video = render(params, spec, bank)
    return video, to_device(torch.tensor([p.label for p in params]), video.device)


# ------------------------------------------------------------------------------------------ commands


def extract(out_dir: Path, wheel: Path | None = None, spec: PhotoSpec = PhotoSpec()) -> list[Path]:
    """Copy the spec's photos into ``out_dir`` from a scikit-image wheel, or from the installed package."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if wheel is not None:
        if not zipfile.is_zipfile(wheel):
            raise InputError(f"{wheel} is not a wheel (zip) file")
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            for name in spec.photos:
                member = f"skimage/data/{name}"
                if member not in names:
                    raise InputError(f"{wheel} has no {member}")
                (out_dir / name).write_bytes(z.read(member))
                written.append(out_dir / name)
        return written
    src = skimage_data_dir()
    if src is None:
        raise InputError("scikit-image is not installed: pass --wheel scikit_image-*.whl")
    for name in spec.photos:
        if not (src / name).is_file():
            raise InputError(f"{src / name} not found")
        (out_dir / name).write_bytes((src / name).read_bytes())
        written.append(out_dir / name)
    return written


def main(argv=None) -> None:
    from slaconv.quality.command_line import one_line_errors

    @one_line_errors
    def run(argv):
        ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        sub = ap.add_subparsers(dest="command", required=True)
        ex = sub.add_parser("extract", help="copy the photos out of a scikit-image wheel (or the installed package)")
        ex.add_argument("out", type=Path)
        ex.add_argument("--wheel", type=Path, default=None)
        pv = sub.add_parser("preview", help="a PNG of videos from the training and the held-out stream")
        pv.add_argument("out", type=Path)
        pv.add_argument("--photos", type=Path, default=None)
        pv.add_argument("--smoke", action="store_true", help="the small spec of the CPU tests")
        args = ap.parse_args(argv)
        if args.command == "extract":
            files = extract(args.out, args.wheel)
            print(f"wrote {len(files)} photos ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB) to {args.out}")
            return
        from slaconv.quality.images import save_video_grid

        spec = SMOKE_PHOTO_SPEC if args.smoke else PhotoSpec()
        bank = photo_bank(spec, folder=args.photos)
        n = len(MOTIONS)
        train, y_train = generate(0, range(n), spec, labels=range(n), bank=bank)
        held, y_held = generate(spec.heldout_stream, range(n), spec, labels=range(n), bank=bank)
        names = [label_name(spec, y) for y in y_train.tolist()] + [f"held out: {label_name(spec, y)}"
                                                                    for y in y_held.tolist()]
        save_video_grid(args.out, list(train) + list(held), row_labels=names, frames=list(range(spec.frames)))
        print(f"wrote {args.out}: {2 * n} videos {tuple(train.shape[1:])}, {spec.tokens()} tokens each")

    run(argv)


if __name__ == "__main__":
    main()
