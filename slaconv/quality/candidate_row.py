"""One row of the candidate comparison, in its own process: convert, calibrate and score one work dir.

    python -m slaconv.quality.candidate_row JOB.json

``JOB.json`` (written by :mod:`slaconv.quality.candidates`) names the original, the calibration data, the row's
recipe and folder, and the candidate's edits.  The row runs ``slaconv convert`` and ``slaconv calibrate``
through the real CLI, then scores the model on the benchmark's held-out (video, noise, sigma) triples -- every
row the same ones, which the row's ``heldout_digest`` proves -- and, when asked, draws samples from the shared
seeds.  It writes ``row.json`` (per-triple losses, stage summaries, seconds) and ``samples.pt`` into its folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

from slaconv.quality import common, metrics
from slaconv.quality.slaconv_cli import SlaconvCLI, stage_summary
from slaconv.quality.workdirs import PIN, alpha_range, edit_sla2_state, load_sla2
from slaconv.utils.files import read_json


def heldout_digest(hs: dict) -> str:
    """sha256 over the held-out videos, noise and noise levels: equal digests, equal triples."""
    h = hashlib.sha256()
    for key in ("x0", "noise", "sigma"):
        h.update(hs[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def use_tf32(device: str) -> bool:
    """On CUDA, TF32 matmuls (as the original was trained with): every row and the original's own scores run
    with the same setting.  Returns whether it is on."""
    if not str(device).startswith("cuda"):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def video_spec(job: dict):
    """The spec the original was trained on, with the job's frame count."""
    spec, _ = common.trained_spec(Path(job["model"]))
    return dataclasses.replace(spec, frames=job["frames"]) if job.get("frames") else spec


@torch.no_grad()
def score(model, job: dict, device) -> dict:
    """Per-triple held-out losses of ``model`` (and its samples when the job asks for them)."""
    spec = video_spec(job)
    hs = metrics.heldout_set(spec, job["heldout_samples"])
    out = {"heldout_losses": metrics.heldout_losses(model, hs, device).tolist(), "heldout_digest": heldout_digest(hs)}
    if job.get("samples"):
        ss = metrics.sampling_set(spec, job["sample_per_class"])
        videos = common.sample(model, ss["noise"].to(device), ss["emb"].to(device), job["sample_steps"],
                               guidance=job["guidance"], null=ss["null"].to(device)).cpu()
        out["samples"] = videos
    return out


def run_row(job: dict, log=print) -> dict:
    """Build and score one row as ``job`` says; returns (and writes) ``row.json``'s content."""
    timer = common.Timer()
    folder = Path(job["folder"])
    work, recipe, data = folder / "work", job["recipe"], job["data"]
    use_tf32(job["device"])
    cli = SlaconvCLI(False, job["device"], log)

    def step(what: str) -> None:  # a line before each step, so a slow or stuck row shows where it is
        log(f"[{timer():.0f} s] {what}")

    step("convert")
    conv = cli("convert", job["model"], "-o", str(work), "--recipe", recipe, "--data", data, "--overwrite")
    stages: dict = {}
    if job["pin_alpha"]:
        edit_sla2_state(work, alpha_logit=PIN)
    if job["stage1"]:
        step("stage 1")
        stages.update(stage_summary(cli("calibrate", str(work), "--data", data, "--stage", "1", "--recipe", recipe)))
        if job["pin_alpha"]:
            edit_sla2_state(work, alpha_logit=PIN)  # stage 1 moved it by at most steps x lr; pin it again
    step("stage 2")
    stages.update(stage_summary(cli("calibrate", str(work), "--data", data, "--stage", "2", "--recipe", recipe)))
    step("score")
    device = common.pick_device(job["device"])
    result = score(load_sla2(work, device), job, device)
    samples = result.pop("samples", None)
    if samples is not None:
        torch.save(samples, folder / "samples.pt")
    row = {"id": job["id"], "folder": job["folder"], "candidate": job["candidate"], "topk": job["topk"], "seed": job["seed"], **result,
           "has_samples": samples is not None, "alpha_min_mean_max": alpha_range(work),
           "topk_per_layer": conv.get("topk_per_layer") or {}, "budget": conv.get("budget"),
           "calibration": stages, "cli_calls": cli.calls, "seconds": round(timer(), 1)}
    common.write_json(folder / "row.json", row)
    step("done")
    return row


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m slaconv.quality.candidate_row JOB.json")
    run_row(read_json(Path(args[0])))


if __name__ == "__main__":
    main()
