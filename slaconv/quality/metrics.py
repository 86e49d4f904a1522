"""Metrics of the quality benchmark.

* :func:`heldout_fm_loss` -- flow-matching loss on held-out videos at fixed noise and fixed noise
  levels (identical inputs for every model, so differences are the models' alone); per sample,
  :func:`heldout_losses`.
* :func:`psnr` / :func:`ssim` -- fidelity of a model's samples to the original model's samples
  drawn from the same noise and class (latent space; values clamped to the data range [-1, 1]).
  SSIM is the standard Gaussian-window SSIM (window 11, sigma 1.5, K1 0.01, K2 0.03), computed per
  frame and channel in plain torch and averaged.
* :class:`FrameClassifier` + :func:`classifier_scores` -- a small 3D-conv network trained on clean
  generated videos (:mod:`slaconv.quality.train_classifier`) that predicts the class of every frame; the semantic
  score of generated samples is the per-frame accuracy w.r.t. the conditioning class, and
  ``consistency`` is the share of frames that agree with their video's majority prediction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slaconv.errors import InputError
from slaconv.quality import common, content
from slaconv.quality import synthvideo as sv
from slaconv.utils.files import read_json

# ------------------------------------------------------------------------------ held-out set


def heldout_set(spec: content.Spec, num: int, *, seed: int = common.HELDOUT_SEED,
                sigmas=(0.15, 0.35, 0.55, 0.75, 0.95)) -> dict[str, torch.Tensor]:
    """Balanced held-out videos with their embeddings, fixed noise and fixed noise levels.

    Sample ``i`` is evaluated at ``sigmas[i % len(sigmas)]`` so every class meets every level.
    """
    labels = sv.balanced_labels(num, spec)
    x0, y = content.generate(seed, range(num), spec, labels=labels)
    gen = torch.Generator().manual_seed(seed * 7919 + 11)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.tensor([sigmas[i % len(sigmas)] for i in range(num)], dtype=torch.float32)
    emb = content.class_embeddings(spec)[y]
    return {"x0": x0, "labels": y, "emb": emb, "noise": noise, "sigma": sigma}


@torch.no_grad()
def heldout_losses(model, hs: dict, device, batch_size: int = 8, emb: torch.Tensor | None = None) -> torch.Tensor:
    """Per held-out sample, the MSE between the predicted velocity and ``noise - x0``: (num,) on the CPU.

    ``emb`` replaces the held-out set's (correct) class embeddings, e.g. by wrong or null ones.
    """
    emb = hs["emb"] if emb is None else emb
    per_sample = []
    for i in range(0, hs["x0"].shape[0], batch_size):
        sl = slice(i, i + batch_size)
        x0, noise, s = hs["x0"][sl].to(device), hs["noise"][sl].to(device), hs["sigma"][sl].to(device)
        x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        v = common.velocity(model, x_t, s, emb[sl].to(device))
        per_sample.append(((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4)).cpu())
    return torch.cat(per_sample)


def heldout_fm_loss(model, hs: dict, device, batch_size: int = 8, emb: torch.Tensor | None = None) -> dict:
    """Mean of :func:`heldout_losses` over the held-out set, plus per noise level."""
    losses = heldout_losses(model, hs, device, batch_size, emb)
    by_sigma = {}
    for s in hs["sigma"].unique().tolist():
        by_sigma[f"{s:.2f}"] = float(losses[hs["sigma"] == s].mean())
    return {"loss": float(losses.mean()), "by_sigma": by_sigma}


@torch.no_grad()
def class_gain(model, hs: dict, spec: content.Spec, device, batch_size: int = 8) -> dict:
    """How much the model's velocity relies on the class: held-out loss with a wrong class (and with the
    null embedding) minus the loss with the right one, overall and per noise level.

    Near zero means the class has taught it nothing about shape (its samples cannot be recognisable);
    it grows as the model learns what each glyph looks like.  The wrong class is ``(y + K/2) mod K``.
    """
    table = content.class_embeddings(spec)
    wrong = table[(hs["labels"] + spec.num_classes // 2) % spec.num_classes]
    null = content.null_embedding(spec).expand_as(hs["emb"])
    right = heldout_fm_loss(model, hs, device, batch_size)
    out = {}
    for name, emb in (("wrong_class", wrong), ("null", null)):
        other = heldout_fm_loss(model, hs, device, batch_size, emb=emb)
        out[name] = {"loss": other["loss"] - right["loss"],
                     "by_sigma": {k: other["by_sigma"][k] - right["by_sigma"][k] for k in right["by_sigma"]}}
    return out


def sampling_set(spec: content.Spec, per_class: int, *, seed: int = common.HELDOUT_SEED + 100,
                 labels=None) -> dict:
    """Fixed noise and conditioning for sample-fidelity comparisons: ``per_class`` videos per class
    (or one per entry of ``labels``).

    ``null`` is the unconditional embedding that guided samplers pair with ``emb``.
    """
    labels = torch.tensor(sv.balanced_labels(per_class * spec.num_classes, spec) if labels is None else labels)
    num = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, spec.channels, spec.frames, spec.size, spec.size, generator=gen)
    return {"noise": noise, "labels": labels, "emb": content.class_embeddings(spec)[labels],
            "null": content.null_embedding(spec)}


# ------------------------------------------------------------------------------ fidelity


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over samples of the PSNR (dB) of ``x`` against ``ref`` (both clamped to [-1, 1])."""
    x, ref = x.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    mse = ((x - ref) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(data_range ** 2 / mse)).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(c ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of (B, C, F, H, W) videos against ``ref``, per frame and channel (valid window)."""
    x, ref = x.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    b, c, f, h, w = x.shape
    win = min(window, h, w)
    g = _gaussian_window(win, sigma, x.device)
    xi = x.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    yi = ref.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    mu_x, mu_y = F.conv2d(xi, g), F.conv2d(yi, g)
    sxx = F.conv2d(xi * xi, g) - mu_x ** 2
    syy = F.conv2d(yi * yi, g) - mu_y ** 2
    sxy = F.conv2d(xi * yi, g) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------ classifier


class FrameClassifier(nn.Module):
    """(B, C, F, H, W) video -> (B, F, K) per-frame class logits.

    3D convolutions (temporal stride 1: every frame keeps its own prediction and sees its two
    neighbours; spatial stride 1, 2, 2), batch norm, then max- and mean-pooling over space and a
    linear head.  Max pooling makes it a detector: the glyphs are small against the background.
    """

    def __init__(self, channels: int = 4, num_classes: int = 8, width: int = 32):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "width": width}
        w = width
        self.net = nn.Sequential(
            nn.Conv3d(channels, w, 3, padding=1), nn.BatchNorm3d(w), nn.GELU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(2 * w), nn.GELU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(4 * w), nn.GELU(),
            nn.Conv3d(4 * w, 4 * w, (1, 3, 3), padding=(0, 1, 1)), nn.GELU(),
        )
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = self.net(video)  # (B, 4w, F, h, w)
        h = torch.cat([h.amax(dim=(3, 4)), h.mean(dim=(3, 4))], dim=1).transpose(1, 2)  # (B, F, 8w)
        return self.head(h)


SPEC_KEYS_THAT_MATTER = ("frames", "size", "channels", "num_classes", "min_objects", "max_objects", "min_scale",
                         "max_scale", "glyph_res")


def spec_mismatch(a: sv.VideoSpec, b: sv.VideoSpec) -> dict:
    """{field: (a's, b's)} for the spec fields that change what the videos look like."""
    return {k: (getattr(a, k), getattr(b, k)) for k in SPEC_KEYS_THAT_MATTER if getattr(a, k) != getattr(b, k)}


def require_same_videos(theirs: sv.VideoSpec, ours: sv.VideoSpec, what: str, than: str) -> None:
    """:class:`InputError` "<what> was trained on other videos than <than>: ..." when the specs differ where
    it matters (theirs' value first)."""
    diff = spec_mismatch(theirs, ours)
    if diff:
        raise InputError(f"{what} was trained on other videos than {than}: "
                         + ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items()))


def classifier_spec(folder: Path) -> sv.VideoSpec:
    """The video spec a saved judge was trained on (classifier.json's summary)."""
    cfg = read_json(Path(folder) / "classifier.json")
    theirs = cfg.get("summary", {}).get("spec")
    if theirs is None:
        raise InputError(f"{folder}/classifier.json has no summary.spec")
    return sv.VideoSpec.from_dict(theirs)


def save_classifier(model: FrameClassifier, folder: Path, extra: dict | None = None) -> None:
    """Write ``classifier.safetensors`` and ``classifier.json`` (config + ``extra``) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "classifier.safetensors"))
    (folder / "classifier.json").write_text(json.dumps({**model.config, **(extra or {})}, indent=2) + "\n")


def load_classifier(folder: Path, device="cpu") -> FrameClassifier:
    """A judge saved by :func:`save_classifier`, in eval mode on ``device``."""
    folder = Path(folder)
    cfg = read_json(folder / "classifier.json")
    model = FrameClassifier(cfg["channels"], cfg["num_classes"], cfg["width"])
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.to(device).eval()


def frame_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Per-frame accuracy of ``pred`` (videos, frames) against ``labels`` (videos,), and its standard error
    over videos: frames of one video are not independent draws, so the unit of sampling is the video
    (0 for a single video)."""
    per_video = (pred == labels.view(-1, 1)).float().mean(dim=1)
    se = float(per_video.std() / per_video.numel() ** 0.5) if per_video.numel() > 1 else 0.0
    return float(per_video.mean()), se


@torch.no_grad()
def classifier_scores(clf: FrameClassifier, videos: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> dict:
    """Per-frame accuracy against ``labels`` (and its standard error over videos); frame-to-frame
    consistency; video-level (majority) accuracy."""
    device = next(clf.parameters()).device
    preds = []
    for i in range(0, videos.shape[0], batch_size):
        logits = clf(videos[i : i + batch_size].to(device).float().clamp(-1, 1))
        preds.append(logits.argmax(-1).cpu())
    pred = torch.cat(preds)  # (B, F)
    labels = labels.view(-1, 1).cpu()
    majority = pred.mode(dim=1).values.view(-1, 1)
    accuracy, accuracy_se = frame_accuracy(pred, labels)
    return {
        "accuracy": accuracy,
        "accuracy_se": accuracy_se,
        "consistency": float((pred == majority).float().mean()),
        "video_accuracy": float((majority == labels).float().mean()),
    }


@torch.no_grad()
def sample_class_scores(model, clf: FrameClassifier, spec: sv.VideoSpec, device, *, per_class: int, steps: int,
                        guidances=(1.0,), shift: float = common.SAMPLE_SHIFT) -> tuple[dict, dict]:
    """The judge's scores of the model's own samples (fixed noise, ``per_class`` per class), per guidance scale.

    Returns ``({guidance: scores}, {guidance: videos})``.
    """
    ss = sampling_set(spec, per_class)
    scores, videos = {}, {}
    for g in guidances:
        v = common.sample(model, ss["noise"].to(device), ss["emb"].to(device), steps, shift, guidance=g,
                          null=ss["null"].to(device)).cpu()
        scores[f"{g:g}"] = classifier_scores(clf, v, ss["labels"])
        videos[f"{g:g}"] = v
    return scores, videos


def summarize_fidelity(samples: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """PSNR and SSIM of ``samples`` against ``reference`` (both None without a reference)."""
    if reference is None:
        return {"psnr": None, "ssim": None}
    return {"psnr": psnr(samples, reference), "ssim": ssim(samples, reference)}


def fmt(x, spec: str = ".4f") -> str:
    """``x`` formatted for a table; "—" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)
