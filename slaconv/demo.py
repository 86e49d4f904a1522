"""``slaconv demo``: the whole pipeline on a tiny Wan model made locally, in about a minute on a CPU.

It builds a small ``WanTransformer3DModel`` (random weights, seeded) and a synthetic calibration
set, then runs convert -> calibrate -> validate -> push (dry run) through the same functions the
CLI verbs call, and returns a short table of what each stage measured.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .recipe import Recipe

TINY_WAN = {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 64, "ffn_dim": 128, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64,
}

# 4 x 32 x 32 latents -> 1,024 tokens = 16 blocks of 64: top-k 0.25 keeps 4 key blocks per query block.
DEMO_RECIPE = {
    "name": "demo-tiny-wan",
    "sla2": {"topk": 0.25, "block_q": 64, "block_k": 64, "quant": "int8-fp8"},
    "data": {"frames": 4, "height": 32, "width": 32, "text_len": 8},
    "calibration": {
        "checkpoint_every": 20,
        "stage1": {"steps": 60, "lr": 1.0e-3, "alpha_lr": 5.0e-2, "query_blocks_per_step": 4},
        "stage2": {"steps": 30, "lr": 1.0e-5, "objective": "distill", "warmup_steps": 2},
    },
    "validation": {"num_samples": 2, "sample_steps": 4},  # the default gates: docs/design.md, section 5
}


def build_tiny_wan(folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny Wan transformer as a diffusers folder (once)."""
    from diffusers import WanTransformer3DModel

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    WanTransformer3DModel(**TINY_WAN).save_pretrained(folder)
    return folder


def run_demo(out: Path, *, fresh: bool = False, show_progress: bool = True, log=print) -> dict:
    from .calibrate import calibrate
    from .convert import convert
    from .errors import QualityGateError, SlaconvError
    from .push import push
    from .synthetic_data import write_synthetic_dataset
    from .validate import validate
    from .workdir import WorkDir

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "demo-recipe.yaml"
    recipe = Recipe.from_dict(DEMO_RECIPE)
    recipe.save(recipe_path)

    log(f"[1/5] tiny Wan model -> {out / 'base'}")
    base = build_tiny_wan(out / "base")
    log(f"[2/5] synthetic calibration data -> {out / 'data'}")
    d = recipe.data
    data = write_synthetic_dataset(out / "data", num_samples=8, channels=TINY_WAN["in_channels"], frames=d.frames,
                                   height=d.height, width=d.width, text_len=d.text_len,
                                   text_dim=TINY_WAN["text_dim"], seed=0)
    work = out / "work"
    log(f"[3/5] convert -> {work}")
    conv = convert(str(base), work, recipe, overwrite=True, data_dir=data)
    log("[4/5] calibrate: stage 1 (router + alpha), stage 2 (QAT distillation)")
    cal = calibrate(work, recipe, data_dir=data, show_progress=show_progress)
    log("[5/5] validate, then push --dry-run")
    try:
        report = validate(work, recipe, data_dir=data)
    except QualityGateError:
        report = WorkDir(work).read_validation_report()
    try:
        pushed = push(work, "local/slaconv-demo-tiny-wan", dry_run=True)
        push_row = f"| push | dry run: files that would upload | {len(pushed['files'])} |"
    except SlaconvError as exc:  # a failed or missing validation: push refuses, and the table says why
        pushed, push_row = {}, f"| push | dry run refused (exit {exc.exit_code}) | {exc} |"
    s1, s2 = cal["stage1"], cal["stage2"]
    table = "\n".join([
        "",
        f"slaconv demo: {len(conv['layers'])} SLA2 layers, top-k {recipe.sla2.topk} "
        f"(sparsity {report['summary']['sparsity_mean']:.2f}), {recipe.sla2.quant}",
        "",
        "| stage | measure | value |",
        "|---|---|---|",
        f"| stage 1 | held-out attention rel. MSE, before -> after | {s1['heldout_attention_rel_mse_before']:.4f}"
        f" -> {s1['heldout_attention_rel_mse_after']:.4f} |",
        f"| stage 2 | held-out distillation loss, before -> after | {s2['heldout_loss_before']:.3g} -> {s2['heldout_loss_after']:.3g} |",
        *validation_rows(report),
        push_row,
        "",
        "The tiny model has random weights: its attention carries little of its output, so any SLA2 version of it",
        "shows small velocity errors and high PSNRs; what tells is where the model sits against its baselines.",
        f"work dir: {work}   report: {WorkDir(work).validation_markdown_path}",
    ])
    return {"work_dir": str(work), "validation": report["summary"], "baselines": report["baselines"],
            "passed": report["passed"], "calibration": {k: cal[k] for k in ("stage1", "stage2")},
            "push_files": pushed.get("files", []), "table": table}


def validation_rows(report: dict) -> list[str]:
    """The demo table's validation rows: each figure of the model beside the same figure of the convert-only
    baseline (the original with SLA2 before calibration) and, for the velocity and samples, the dense one."""
    from .validate import PSNR_IDENTICAL

    s, base, dense = report["summary"], report["baselines"]["convert_only"], report["baselines"]["dense"]
    steps = report["settings"]["sample_steps"]
    return [
        "| validate | (this model / convert only / dense) | |",
        f"| validate | attention rel. L2 | {s['attention_rel_l2_mean']:.4f} / {base['attention_rel_l2_mean']:.4f} /"
        " - (full attention) |",
        f"| validate | velocity rel. L2 | {s['velocity_rel_l2_mean']:.4f} / {base['velocity_rel_l2_mean']:.4f} /"
        f" {dense['velocity_rel_l2_mean']:.4f} |",
        f"| validate | {steps}-step sample PSNR vs the original's sample, dB ({PSNR_IDENTICAL:.0f}: identical) | "
        f"{s['sample_psnr_db']:.2f} / {base['sample_psnr_db']:.2f} / {dense['sample_psnr_db']:.2f} |",
        f"| validate | quality gates | {'passed' if report['passed'] else 'FAILED'} |",
    ]
