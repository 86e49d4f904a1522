"""Scoring one row of the quality table: held-out loss, sample fidelity to the original, the judge's verdict."""

from __future__ import annotations

from pathlib import Path

import torch

from slaconv.quality import common, metrics
from slaconv.quality import synthvideo as sv


class Evaluator:
    """Scores models on the same held-out inputs and sampling noise.

    The first model scored is the reference: later models' samples are compared with its samples
    (PSNR / SSIM).  Every model's samples are kept in ``samples`` under the name it was scored as;
    ``real`` holds real videos of the sampled classes, and ``real_scores`` the judge's verdict on them.
    """

    def __init__(self, spec: sv.VideoSpec, settings: dict, classifier_dir: Path | None, device: torch.device, log):
        self.spec, self.settings, self.device, self.log = spec, settings, device, log
        self.heldout = metrics.heldout_set(spec, settings["heldout_samples"])
        self.sampling = metrics.sampling_set(spec, settings["sample_per_class"])
        self.classifier = metrics.load_classifier(classifier_dir, device) if classifier_dir else None
        self.reference: torch.Tensor | None = None
        self.samples: dict[str, torch.Tensor] = {}
        labels = self.sampling["labels"]
        self.real, real_labels = sv.generate(common.HELDOUT_SEED, range(labels.shape[0]), spec,
                                             labels=labels.tolist())
        self.real_scores = self.classify(self.real, real_labels)

    def classify(self, videos: torch.Tensor, labels: torch.Tensor) -> dict:
        """The judge's scores of ``videos`` against ``labels`` (all None without a judge)."""
        if self.classifier is None:
            return {"accuracy": None, "accuracy_se": None, "consistency": None, "video_accuracy": None}
        return metrics.classifier_scores(self.classifier, videos, labels)

    @torch.no_grad()
    def __call__(self, name: str, model) -> dict:
        """Every metric of ``model``; its samples are kept as ``samples[name]``."""
        timer = common.Timer()
        loss = metrics.heldout_fm_loss(model, self.heldout, self.device)
        ss = self.sampling
        videos = common.sample(model, ss["noise"].to(self.device), ss["emb"].to(self.device),
                               self.settings["sample_steps"], guidance=self.settings["guidance"],
                               null=ss["null"].to(self.device)).cpu()
        self.samples[name] = videos
        if self.reference is None:
            self.reference = videos
            fid = {"psnr": None, "ssim": None}
        else:
            fid = metrics.summarize_fidelity(videos, self.reference)
        cls = self.classify(videos, ss["labels"])
        res = {"heldout_fm_loss": loss["loss"], "heldout_fm_loss_by_sigma": loss["by_sigma"], **fid,
               "class_accuracy": cls["accuracy"], "class_accuracy_se": cls["accuracy_se"],
               "frame_consistency": cls["consistency"],
               "video_accuracy": cls["video_accuracy"], "eval_seconds": round(timer(), 2)}
        self.log(f"  eval {name}: FM loss {res['heldout_fm_loss']:.4f}, PSNR {metrics.fmt(res['psnr'], '.2f')}, "
                 f"SSIM {metrics.fmt(res['ssim'], '.4f')}, acc {metrics.fmt(res['class_accuracy'], '.3f')} "
                 f"({res['eval_seconds']:.1f} s)")
        return res
