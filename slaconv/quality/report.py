"""The quality table's outputs: results.md (the table), results.json (everything) and samples.png."""

from __future__ import annotations

from pathlib import Path

import torch

from slaconv.quality import common
from slaconv.quality.images import save_frame_grid
from slaconv.quality.metrics import fmt
from slaconv.utils.files import write_text_atomic


def accuracy_cell(row: dict) -> str:
    """Classifier accuracy with its standard error over the sample videos (older results have none)."""
    acc, se = row.get("class_accuracy"), row.get("class_accuracy_se")
    if acc is None:
        return "—"
    return f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def design(settings: dict) -> str:
    """The converted rows' design choices (``--sla2``), or the paper's configuration."""
    chosen = settings.get("sla2") or {}
    return ", ".join(f"{k} {v}" for k, v in chosen.items()) or "the paper's (softmax feature map, alpha per head)"


def markdown(result: dict) -> str:
    """results.md: the settings in one paragraph, the table of rows, the validate table and the samples."""
    s = result["settings"]
    f = fmt
    lines = [
        "# SLA2 quality benchmark (SynthVideo DiT)",
        "",
        f"{result['tokens_per_sample']:,} tokens/sample, blocks {s['block_q']}x{s['block_k']}, low-bit mode "
        f"{s['quant']}; design: {design(s)}; stage 1: {s['stage1']['steps']} steps (lr {s['stage1']['lr']}); stage 2: "
        f"{s['stage2']['steps']} steps x batch {s['stage2']['batch_size']} (lr {s['stage2']['lr']}, objective "
        f"{s['objective']}, calibration noise shift {s['stage2'].get('timestep_shift', s['timestep_shift'])}); "
        f"{s['calib_samples']} calibration videos (1 round of the classes in {s['calib_null_every']} with the null "
        f"embedding); samples: {s['sample_steps']}-step Euler, shift {s['timestep_shift']}, "
        f"classifier-free guidance {s['guidance']:g} for every row, {s['sample_per_class']} per class; held-out "
        f"loss (conditional, unguided) on {s['heldout_samples']} "
        f"videos.  Device: {result['env'].get('gpu') or s['device']}; total {result['seconds_total']:.0f} s.",
        "",
        f"Classifier on real videos: per-frame accuracy {f(result['real_data_classifier']['accuracy'], '.3f')} "
        f"(chance {result['chance']:.3f}).",
        "",
        "| group | row | stage 1 | stage 2 | eval | held-out FM loss | PSNR vs orig (dB) | SSIM vs orig | "
        "class acc ± s.e. | frame consistency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['group']} | {r['name']} | {'yes' if r['stage1'] else '—'} | {'yes' if r['stage2'] else '—'} | "
            f"{r['eval_quant'] or 'bf16 SDPA'} | {f(r['heldout_fm_loss'])} | {f(r['psnr'], '.2f')} | "
            f"{f(r['ssim'], '.4f')} | {accuracy_cell(r)} | {f(r['frame_consistency'], '.3f')} |")
    if result["validate"]:
        lines += ["", "`slaconv validate` on the main SLA2 rows, under the default quality gates (in brackets: the "
                  "same figure of the convert-only baseline, the original with SLA2 before calibration):", "",
                  "| row | attention rel. L2 | attention cosine | velocity rel. L2 | 4-step sample PSNR (dB) "
                  "| sparsity | gates |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in result["validate"].items():
            base = v.get("convert_only") or {}

            def both(key, spec=".4g", v=v, base=base):
                return f"{f(v.get(key), spec)} ({f(base.get(key), spec)})"

            gates = {True: "passed", False: "FAILED"}.get(v.get("passed"), "—")
            lines.append(f"| {k} | {both('attention_rel_l2_mean')} | {both('attention_cosine_mean')} | "
                         f"{both('velocity_rel_l2_mean')} | {both('sample_psnr_db', '.2f')} | "
                         f"{f(v.get('sparsity_mean'), '.3f')} | {gates} |")
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)


def save_samples(path: Path, names: list[str], videos: list[torch.Tensor]) -> None:
    """samples.png: one row per model (same noise in every row), two of its samples, up to 4 frames of each."""
    n_samples, n_frames = videos[0].shape[0], videos[0].shape[2]
    picks = sorted({0, n_samples // 2 + 1 if n_samples > 2 else n_samples - 1})
    frames = list(range(0, n_frames, max(1, n_frames // 4)))[:4]
    save_frame_grid(path, [[v[p] for p in picks] for v in videos], frames, row_labels=names,
                    group_titles=[f"sample {p} (frames {frames})" for p in picks])


def write_results(out: Path, result: dict) -> None:
    """results.json and results.md in ``out``; the partial results of an unfinished run are removed."""
    common.write_json(out / "results.json", result)
    (out / "results.partial.json").unlink(missing_ok=True)
    write_text_atomic(out / "results.md", markdown(result))
