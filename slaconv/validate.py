"""``slaconv validate``: the original and the SLA2 model on the same seeded inputs.

Reports, per converted layer, the error of SLA2 attention against full attention on the Q/K/V
the SLA2 model itself produces (relative L2 and cosine, with the real sparsity); the velocity
error at several timesteps; and a short Euler sampling run from the same noise (final-latent
relative L2 and PSNR).  Writes ``reports/validation.json``, ``validation.md`` and PNG plots, and
raises :class:`QualityGateError` (exit 4) when a recipe gate fails -- after writing the reports.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import flow
from .calibrate import StepSampler
from .errors import QualityGateError
from .inputs import denoiser_forward
from .install import sla2_processors
from .kernels import reference
from .observe import observe_attention
from .plots import bar_chart, mask_image
from .recipe import Recipe
from .utils.devices import DTYPES
from .utils.files import write_json, write_text_atomic
from .workdir import WorkDir

MAX_ROWS_PER_LAYER = 4096  # query rows compared per layer and sample (full attention is O(rows * N))


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _layer_metrics(model, family, batch, sigma, device, dtype, gen):
    """Run the SLA2 model once; every SLA2 layer compares itself with full attention on its own Q/K/V."""
    stats: dict[str, dict] = {}
    masks: dict[str, torch.Tensor] = {}

    def observe(proc, q, k, v):
        out = proc.sparse_attention(q, k, v)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        n = qh.shape[2]
        rows = torch.arange(n, device=q.device)
        if n > MAX_ROWS_PER_LAYER:
            rows = torch.randperm(n, generator=gen)[:MAX_ROWS_PER_LAYER].sort().values.to(q.device)
        full = reference.full_attention_reference(qh, kh, vh, rows)
        sla = out.transpose(1, 2)[:, :, rows]
        mask = proc.block_mask(q, k)
        token_density = mask.float().repeat_interleave(proc.block_k, dim=-1)[..., :n].mean()  # ragged last block
        s = stats.setdefault(proc.layer_name, {"rel_l2": [], "cosine": [], "sparsity": []})
        s["rel_l2"].append(_rel_l2(sla, full))
        s["cosine"].append(_cosine(sla, full))
        s["sparsity"].append(1.0 - float(token_density))
        masks.setdefault(proc.layer_name, mask[0, 0].cpu())
        return out

    x_t = flow.add_noise(batch["latents"], batch["noise"], sigma)
    with observe_attention(model, observe), torch.no_grad():
        denoiser_forward(model, family, batch, x_t, sigma, device, dtype)
    return stats, masks


def validate(workdir: Path | WorkDir, recipe: Recipe, *, data_dir=None, base: str | None = None, device="cpu",
             quant: str | None = None) -> dict:
    """Compare the work dir's SLA2 model with the original; write reports; return the report dict."""
    work = WorkDir.open(workdir)
    v = recipe.validation
    dtype_name = recipe.model.dtype
    model, family, sla2_cfg = work.load_model(dtype=dtype_name, device=device, quant=quant)
    original = work.load_base_model(dtype=dtype_name, device=device, base=base)
    dtype = DTYPES[dtype_name]
    model_config = work.read_model_config()
    sampler = StepSampler(family, model_config, recipe.override({"calibration.seed": v.seed}), 1, data_dir)
    gen = torch.Generator().manual_seed(v.seed)

    layer_stats: dict[str, dict] = {}
    first_masks = None
    velocity: dict[str, list[float]] = {str(t): [] for t in v.timesteps}
    sample_rel, sample_psnr = [], []
    for i in range(v.num_samples):
        batch = sampler.batch(i)
        stats, masks = _layer_metrics(model, family, batch, torch.tensor([0.5]), device, dtype, gen)
        first_masks = first_masks or masks
        for name, s in stats.items():
            agg = layer_stats.setdefault(name, {"rel_l2": [], "cosine": [], "sparsity": []})
            for key in agg:
                agg[key].extend(s[key])
        with torch.no_grad():
            for t in v.timesteps:
                sigma = torch.tensor([t / 1000.0])
                x_t = flow.add_noise(batch["latents"], batch["noise"], sigma)
                ref = denoiser_forward(original, family, batch, x_t, sigma, device, dtype)
                out = denoiser_forward(model, family, batch, x_t, sigma, device, dtype)
                velocity[str(t)].append(_rel_l2(out, ref))

        def predictor(net):
            # Called within this iteration: the closure never outlives its batch.
            return lambda x, t: denoiser_forward(net, family, batch, x, t.cpu() / 1000.0, device, dtype)  # noqa: B023

        noise = batch["noise"].to(device, dtype)
        final_ref = flow.euler_sample(predictor(original), noise, v.sample_steps, v.timestep_shift).float()
        final_sla = flow.euler_sample(predictor(model), noise, v.sample_steps, v.timestep_shift).float()
        sample_rel.append(_rel_l2(final_sla, final_ref))
        mse = float(torch.mean((final_sla - final_ref) ** 2))
        peak = float(final_ref.max() - final_ref.min())
        sample_psnr.append(99.0 if mse == 0 else 10 * math.log10(peak ** 2 / mse))

    layers = []
    for name, proc in sla2_processors(model).items():
        s = layer_stats[name]
        layers.append({
            "layer": name,
            "attention_rel_l2": sum(s["rel_l2"]) / len(s["rel_l2"]),
            "attention_cosine": sum(s["cosine"]) / len(s["cosine"]),
            "sparsity": sum(s["sparsity"]) / len(s["sparsity"]),
            "topk": proc.topk,
            "alpha": [round(float(a), 4) for a in torch.sigmoid(proc.alpha_logit.detach().float())],
        })
    summary = {
        "attention_rel_l2_mean": sum(x["attention_rel_l2"] for x in layers) / len(layers),
        "attention_cosine_mean": sum(x["attention_cosine"] for x in layers) / len(layers),
        "velocity_rel_l2_mean": sum(sum(x) / len(x) for x in velocity.values()) / len(velocity),
        "sample_rel_l2": sum(sample_rel) / len(sample_rel),
        "sample_psnr_db": sum(sample_psnr) / len(sample_psnr),
        "sparsity_mean": sum(x["sparsity"] for x in layers) / len(layers),
        "quant": quant or sla2_cfg.attention.quant,
    }
    gates = v.gates.to_dict()
    checks = {
        "attention_rel_l2_max": summary["attention_rel_l2_mean"] <= gates["attention_rel_l2_max"],
        "velocity_rel_l2_max": summary["velocity_rel_l2_mean"] <= gates["velocity_rel_l2_max"],
        "sample_psnr_min_db": summary["sample_psnr_db"] >= gates["sample_psnr_min_db"],
    }
    report = {
        "passed": all(checks.values()),
        "gates": {k: {"threshold": gates[k], "passed": ok} for k, ok in checks.items()},
        "summary": summary,
        "velocity_rel_l2_by_timestep": {t: sum(x) / len(x) for t, x in velocity.items()},
        "layers": layers,
        "settings": {"num_samples": v.num_samples, "seed": v.seed, "timesteps": list(v.timesteps),
                     "sample_steps": v.sample_steps, "data": Path(data_dir).name if data_dir else "synthetic"},
    }
    _write_reports(work, report, first_masks)
    work.update_sla2_config(validation={"passed": report["passed"], **summary})
    if not report["passed"]:
        failed = ", ".join(k for k, ok in checks.items() if not ok)
        raise QualityGateError(f"quality gate failed ({failed}); see {work.validation_markdown_path}")
    return report


def _write_reports(work: WorkDir, report: dict, masks: dict | None) -> None:
    out = work.reports_dir
    out.mkdir(exist_ok=True)
    write_json(work.validation_report_path, report)
    layers = report["layers"]
    bar_chart(out / "layer_error.png", [x["layer"] for x in layers],
              {"attention rel L2": [x["attention_rel_l2"] for x in layers],
               "1 - cosine": [1 - x["attention_cosine"] for x in layers]},
              "SLA2 vs full attention, per layer")
    if masks:
        name, mask = next(iter(masks.items()))
        mask_image(out / "router_mask.png", mask, f"router mask {name} head 0 (dark = sparse)")
    write_text_atomic(work.validation_markdown_path, markdown_report(report))


def markdown_report(report: dict) -> str:
    """The human-readable ``reports/validation.md`` of a validation report."""
    s = report["summary"]
    lines = [
        f"# SLA2 validation: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        "| metric | value | gate |",
        "|---|---|---|",
        f"| attention rel. L2 (mean over layers) | {s['attention_rel_l2_mean']:.4f} | <= {report['gates']['attention_rel_l2_max']['threshold']} |",
        f"| attention cosine (mean) | {s['attention_cosine_mean']:.4f} | |",
        f"| velocity rel. L2 (mean over timesteps) | {s['velocity_rel_l2_mean']:.4f} | <= {report['gates']['velocity_rel_l2_max']['threshold']} |",
        f"| sample final-latent rel. L2 | {s['sample_rel_l2']:.4f} | |",
        f"| sample PSNR (dB) | {s['sample_psnr_db']:.2f} | >= {report['gates']['sample_psnr_min_db']['threshold']} |",
        f"| sparsity (mean) | {s['sparsity_mean']:.3f} | |",
        f"| low-bit mode | {s['quant']} | |",
        "",
        "| layer | rel. L2 | cosine | sparsity | alpha per head |",
        "|---|---|---|---|---|",
    ]
    for x in report["layers"]:
        alpha = ", ".join(f"{a:.2f}" for a in x["alpha"])
        lines.append(f"| {x['layer']} | {x['attention_rel_l2']:.4f} | {x['attention_cosine']:.4f} | {x['sparsity']:.3f} | {alpha} |")
    lines += ["", "| timestep | velocity rel. L2 |", "|---|---|"]
    lines += [f"| {t} | {e:.4f} |" for t, e in report["velocity_rel_l2_by_timestep"].items()]
    lines += ["", "![per-layer error](layer_error.png) ![router mask](router_mask.png)", ""]
    return "\n".join(lines)
