"""``slaconv validate``: the original and the SLA2 model on the same seeded inputs.

Reports, per converted layer, the error of SLA2 attention against full attention on the Q/K/V
the SLA2 model itself produces (relative L2 and cosine, with the real sparsity); the velocity
error at several timesteps; and a short Euler sampling run from the same noise (final-latent
relative L2 and PSNR).  Beside the model's figures it measures two baselines on the same inputs, so
that a reader sees where the model sits between them: ``dense``, this model's weights with full
attention (for a model whose weights were not fine-tuned, the original itself: ~0 error), and
``convert_only``, the original with SLA2 as ``convert`` left it (identity router, initial alpha).

Writes ``reports/validation.json``, ``validation.md`` and PNG plots, with the digest of the weights
and settings it measured (:mod:`slaconv.validation_state`), and raises :class:`QualityGateError`
(exit 4) when a recipe gate fails -- after writing the reports.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import flow
from .calibrate import StepSampler
from .convert import install_convert_only
from .digest import weights_digest
from .errors import QualityGateError
from .inputs import denoiser_forward
from .install import set_mode, sla2_processors, stock_processors
from .kernels import reference
from .observe import observe_attention
from .recipe import Recipe
from .utils.devices import DTYPES
from .validation_report import write_reports
from .workdir import WorkDir

MAX_ROWS_PER_LAYER = 4096  # query rows compared per layer and sample (full attention is O(rows * N))
MASK_HEADS_SHOWN = 4  # heads drawn in router_mask.png
BASELINES = ("dense", "convert_only")
PSNR_IDENTICAL = 99.0
"""The sample PSNR's ceiling: what identical samples read (their true PSNR is infinite), and samples that differ
by float rounding only (the dense control's ~1e-16 squared error would read 160 dB)."""


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _psnr(sample: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(torch.mean((sample - ref) ** 2))
    peak = float(ref.max() - ref.min())
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(peak ** 2 / mse))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


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
        masks.setdefault(proc.layer_name, mask[0, :MASK_HEADS_SHOWN].cpu())
        return out

    x_t = flow.add_noise(batch["latents"], batch["noise"], sigma)
    with observe_attention(model, observe), torch.no_grad():
        denoiser_forward(model, family, batch, x_t, sigma, device, dtype)
    return stats, masks


@contextlib.contextmanager
def _dense_mode(model):
    set_mode(model, "dense")
    try:
        yield
    finally:
        set_mode(model, "sla2")


class _Tally:
    """One compared model's per-layer, per-timestep and per-sample figures, over every sample."""

    def __init__(self, timesteps):
        self.layers: dict[str, dict[str, list[float]]] = {}
        self.velocity: dict[str, list[float]] = {str(t): [] for t in timesteps}
        self.sample_rel: list[float] = []
        self.sample_psnr: list[float] = []

    def add_layers(self, stats: dict) -> None:
        for name, s in stats.items():
            agg = self.layers.setdefault(name, {"rel_l2": [], "cosine": [], "sparsity": []})
            for key in agg:
                agg[key].extend(s[key])

    def summary(self) -> dict:
        out = {}
        if self.layers:
            out["attention_rel_l2_mean"] = _mean(_mean(s["rel_l2"]) for s in self.layers.values())
            out["attention_cosine_mean"] = _mean(_mean(s["cosine"]) for s in self.layers.values())
        out["velocity_rel_l2_mean"] = _mean(_mean(x) for x in self.velocity.values())
        out["sample_rel_l2"] = _mean(self.sample_rel)
        out["sample_psnr_db"] = _mean(self.sample_psnr)
        if self.layers:
            out["sparsity_mean"] = _mean(_mean(s["sparsity"]) for s in self.layers.values())
        return out


def validate(workdir: Path | WorkDir, recipe: Recipe, *, data_dir=None, base: str | None = None, device="cpu",
             quant: str | None = None) -> dict:
    """Compare the work dir's SLA2 model and the two baselines with the original; write reports; return the
    report dict."""
    work = WorkDir.open(workdir)
    v = recipe.validation
    dtype_name = recipe.model.dtype
    file_hashes = work.file_hashes()  # what is measured, read before the model is
    settings = work.measured_settings(quant)
    model, family, sla2_cfg = work.load_model(dtype=dtype_name, device=device, quant=quant)
    original = work.load_base_model(dtype=dtype_name, device=device, base=base)
    dtype = DTYPES[dtype_name]
    model_config = work.read_model_config()
    attention = sla2_cfg.attention if quant is None else sla2_cfg.attention.replace(quant=quant)
    alpha_source = install_convert_only(original, family, sla2_cfg, attention, recipe, model_config, data_dir, device)
    sampler = StepSampler(family, model_config, recipe.override({"calibration.seed": v.seed}), 1, data_dir)

    def reference_net():
        return stock_processors(original, family)

    # (model, the context it runs in) per compared row; the reference is the original with stock attention
    compared = {"model": (model, contextlib.nullcontext), "dense": (model, lambda: _dense_mode(model)),
                "convert_only": (original, contextlib.nullcontext)}
    tallies = {key: _Tally(v.timesteps) for key in compared}
    first_masks = None
    for i in range(v.num_samples):
        batch = sampler.batch(i)
        for key in ("model", "convert_only"):  # the same rows of every layer for both: one seed each
            net = compared[key][0]
            stats, masks = _layer_metrics(net, family, batch, torch.tensor([0.5]), device, dtype,
                                          torch.Generator().manual_seed(v.seed + i))
            tallies[key].add_layers(stats)
            if key == "model":
                first_masks = first_masks or masks
        with torch.no_grad():
            for t in v.timesteps:
                sigma = torch.tensor([t / 1000.0])
                x_t = flow.add_noise(batch["latents"], batch["noise"], sigma)
                with reference_net():
                    ref = denoiser_forward(original, family, batch, x_t, sigma, device, dtype)
                for key, (net, context) in compared.items():
                    with context():
                        out = denoiser_forward(net, family, batch, x_t, sigma, device, dtype)
                    tallies[key].velocity[str(t)].append(_rel_l2(out, ref))

        def predictor(net):
            # Called within this iteration: the closure never outlives its batch.
            return lambda x, t: denoiser_forward(net, family, batch, x, t.cpu() / 1000.0, device, dtype)  # noqa: B023

        noise = batch["noise"].to(device, dtype)
        with reference_net():
            final_ref = flow.euler_sample(predictor(original), noise, v.sample_steps, v.timestep_shift).float()
        for key, (net, context) in compared.items():
            with context():
                final = flow.euler_sample(predictor(net), noise, v.sample_steps, v.timestep_shift).float()
            tallies[key].sample_rel.append(_rel_l2(final, final_ref))
            tallies[key].sample_psnr.append(_psnr(final, final_ref))

    ours = tallies["model"]
    layers = []
    for name, proc in sla2_processors(model).items():
        s = ours.layers[name]
        layers.append({
            "layer": name,
            "attention_rel_l2": _mean(s["rel_l2"]),
            "attention_cosine": _mean(s["cosine"]),
            "sparsity": _mean(s["sparsity"]),
            "topk": proc.topk,
            "alpha": [round(float(a), 4) for a in torch.sigmoid(proc.alpha_logit.detach().float())],
        })
    baselines = {key: tallies[key].summary() for key in BASELINES}
    baselines["convert_only"]["alpha"] = alpha_source
    summary = {**ours.summary(), "quant": quant or sla2_cfg.attention.quant}
    summary["velocity_vs_convert_only"] = (summary["velocity_rel_l2_mean"]
                                           / max(baselines["convert_only"]["velocity_rel_l2_mean"], 1e-12))
    gates = v.gates.to_dict()
    checks = {
        "attention_rel_l2_max": summary["attention_rel_l2_mean"] <= gates["attention_rel_l2_max"],
        "velocity_rel_l2_max": summary["velocity_rel_l2_mean"] <= gates["velocity_rel_l2_max"],
        "sample_psnr_min_db": summary["sample_psnr_db"] >= gates["sample_psnr_min_db"],
        "velocity_vs_convert_only_max": summary["velocity_vs_convert_only"] <= gates["velocity_vs_convert_only_max"],
    }
    digest = weights_digest(file_hashes, settings)
    report = {
        "passed": all(checks.values()),
        "gates": {k: {"threshold": gates[k], "passed": ok} for k, ok in checks.items()},
        "summary": summary,
        "baselines": baselines,
        "velocity_rel_l2_by_timestep": {t: _mean(x) for t, x in ours.velocity.items()},
        "layers": layers,
        "settings": {"num_samples": v.num_samples, "seed": v.seed, "timesteps": list(v.timesteps),
                     "sample_steps": v.sample_steps, "data": Path(data_dir).name if data_dir else "synthetic"},
        "weights": {"digest": digest, "files": file_hashes, "settings": settings},
    }
    write_reports(work, report, first_masks)
    work.update_sla2_config(validation={"passed": report["passed"], **summary, "weights_digest": digest})
    if not report["passed"]:
        failed = ", ".join(k for k, ok in checks.items() if not ok)
        raise QualityGateError(f"quality gate failed ({failed}); see {work.validation_markdown_path}")
    return report
