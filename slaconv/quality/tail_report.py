"""Turning the tail study's accumulated statistics into errors, fitted alphas, loss ratios and tables.

The study (:mod:`slaconv.quality.tail_study`) keeps, per (layer, router, top-k fraction), the sufficient
statistics of every alpha-mixed estimator per (sample, head, query block) (:func:`tail_estimators.mix_stats`)
and the squared errors of the estimators without an alpha.  Errors are relative L2 of one head's attention
output against dense attention, averaged over (sample, head) per layer; a table cell is the mean over layers
(the worst layer beside it in results.json).
"""

from __future__ import annotations

import dataclasses

import torch

from slaconv.quality import tail_estimators as te
from slaconv.quality import tail_mixing as tm

CONVERTER_ALPHA_RANGE = (0.02, 0.98)  # slaconv convert clamps the measured selected mass to this range


@dataclasses.dataclass(frozen=True)
class Row:
    """One estimator of the tables: a tail and how it is mixed with the sparse branch."""

    key: str
    label: str
    tail: str  # "exact", "linear", "mean", "hedgehog", "hedgehog_one", "pooled", "pooled_bias"; "_all": every
    #            key block in the linear branch, the selected ones too
    mixing: str  # "one" (alpha = 1), "head", "head_qblock", "qblock_input", "query", "converter", "shared",
    #              or one of tail_mixing.MIXINGS (fitted on training videos)
    loss: bool = False  # also measured as held-out loss with the replacement in every layer


ROWS = (
    Row("sparse", "sparse branch alone (alpha = 1)", "exact", "one"),
    Row("exact_head", "a. exact tail, alpha per head (least squares)", "exact", "head", True),
    Row("exact_qblock", "b. exact tail, alpha per (head, query block)", "exact", "head_qblock", True),
    Row("exact_qblock_input", "b. exact tail, alpha per query block of each input", "exact", "qblock_input"),
    Row("exact_query", "b. exact tail, alpha per query (closed form)", "exact", "query"),
    Row("linear_converter", "d. linear branch (phi = softmax over d), converter's alpha", "linear", "converter", True),
    Row("linear_head", "d. linear branch, alpha per head (least squares)", "linear", "head", True),
    Row("linear_query", "d. linear branch, alpha per query (closed form)", "linear", "query"),
    Row("mean_head", "e. mean of unselected V, alpha per head", "mean", "head", True),
    Row("mean_query", "e. mean of unselected V, alpha per query (closed form)", "mean", "query"),
    Row("pooled", "f. pooled tail in the shared normaliser", "pooled", "shared", True),
    Row("pooled_bias", "f. pooled tail + learned per-head logit bias", "pooled_bias", "shared", True),
    Row("hedgehog_head", "g. Hedgehog phi, fitted on training videos, alpha per head", "hedgehog", "head", True),
    Row("hedgehog_one_head", "g. Hedgehog phi, fitted on one training video, alpha per head", "hedgehog_one", "head"),
    Row("hedgehog_query", "g. Hedgehog phi (training videos), alpha per query (closed form)", "hedgehog", "query"),
    Row("linear_all_head", "i. linear branch over every key block (no per-block state), alpha per head", "linear_all",
        "head", True),
    Row("hedgehog_all_head", "i. Hedgehog phi over every key block (no per-block state), alpha per head",
        "hedgehog_all", "head", True),
    *(Row(f"{tail}_{mixing}", f"h. {name}, {how}", tail, mixing)
      for tail, name in (("exact", "exact tail"), ("linear", "linear branch"), ("hedgehog", "Hedgehog phi"))
      for mixing, how in (
          ("head_train", "alpha per head fitted on training videos"),
          ("shift", "alpha per query from the pooled tail mass, per-head shift fitted on training videos"),
          ("affine", "alpha per query, per-head affine map of the pooled log-odds (training videos)"),
          ("mass", "alpha per query, per-head shift = mean log gap of the pooled tail mass (training)"),
          ("query_linear", "alpha per query = sigmoid(w . q + c), no mass estimate (training videos)"),
          ("gap_query_linear", "alpha per query from the pooled log-odds and w . q (training videos)"),
          ("block_shift", "alpha per query from the log-odds with the tail pooled per query block, per-head shift"),
          ("block_affine", "alpha per query, affine map of the log-odds with the tail pooled per query block"),
          ("block_gap_query_linear", "alpha per query from the block-pooled log-odds and w . q (training videos)"),
          ("block_query_linear", "alpha per query from the block-pooled log-odds at scale 1 and w . q (training)")))
)
ROW_BY_KEY = {r.key: r for r in ROWS}
MIXED_TAILS = ("exact", "linear", "mean", "hedgehog", "hedgehog_one", "linear_all", "hedgehog_all")
SHARED_TAILS = ("pooled", "pooled_bias")
DIRECT_ROWS = tuple(r.key for r in ROWS if r.mixing in ("shared", *tm.MIXINGS))  # errors measured, not fitted
DENSE_KEY = "dense_fp32"  # losses of the study's own fp32 dense attention through the same hook (row c)


def fitted_alphas(stats: dict[str, torch.Tensor], mass_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The alphas of every mixing granularity from one tail's stacked stats (S, H, nq): per head (H,), per
    (head, query block) (H, nq), per query block of each input (S, H, nq), and the converter's (H,)."""
    return {
        "head": te.least_squares_alpha(stats["a2"].sum(dim=(0, 2)), stats["a1"].sum(dim=(0, 2))),
        "head_qblock": te.least_squares_alpha(stats["a2"].sum(dim=0), stats["a1"].sum(dim=0)),
        "qblock_input": te.least_squares_alpha(stats["a2"], stats["a1"]),
        "converter": mass_mean.double().clamp(*CONVERTER_ALPHA_RANGE),
        "one": torch.ones(stats["a2"].shape[1], dtype=torch.float64, device=stats["a2"].device),
    }


def _broadcast(alpha: torch.Tensor) -> torch.Tensor:
    if alpha.dim() == 1:
        return alpha.view(1, -1, 1)
    return alpha if alpha.dim() == 3 else alpha.unsqueeze(0)


def row_squared_errors(row: Row, cell: dict) -> torch.Tensor:
    """Squared error per (sample, head) of one estimator in one (layer, router, fraction) cell."""
    if row.key in DIRECT_ROWS:
        return cell["direct"][row.key].sum(dim=-1)
    stats = cell["stats"][row.tail]
    if row.mixing == "query":
        return stats["row_best"].sum(dim=-1)
    alpha = fitted_alphas(stats, cell["mass_mean"])[row.mixing]
    return te.mixed_squared_error(stats, _broadcast(alpha)).sum(dim=-1)


def layer_error(row: Row, cell: dict) -> float:
    """Mean over (sample, head) of the relative L2 error in one cell."""
    ref = cell["stats"]["exact"]["ref"].sum(dim=-1)
    return float((row_squared_errors(row, cell).clamp_min(0) / ref).sqrt().mean())


def error_table(cells: dict, rows=ROWS) -> dict:
    """{router: {fraction: {row key: {"mean": ..., "worst": ..., "per_layer": [...]}}}} over every layer."""
    out: dict = {}
    layers = sorted(cells)
    for router, fraction in cells[layers[0]]:
        per_row = {}
        for row in rows:
            errs = [layer_error(row, cells[layer][(router, fraction)]) for layer in layers]
            per_row[row.key] = {"mean": sum(errs) / len(errs), "worst": max(errs), "per_layer": errs}
        out.setdefault(router, {})[fraction] = per_row
    return out


def paired_bootstrap(est: torch.Tensor, base: torch.Tensor, resamples: int = 10_000, seed: int = 0) -> dict:
    """Ratio of mean losses ``mean(est) / mean(base)`` over paired samples, with a percentile 95% interval from
    resampling the pairs, and the same for the difference of the means."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, est.numel(), (resamples, est.numel()), generator=g)
    e, b = est.double()[idx].mean(dim=1), base.double()[idx].mean(dim=1)
    ratio, diff = e / b, e - b

    def ci(x):
        return [float(torch.quantile(x, 0.025)), float(torch.quantile(x, 0.975))]

    return {"ratio": float(est.double().mean() / base.double().mean()), "ratio_ci": ci(ratio),
            "difference": float(est.double().mean() - base.double().mean()), "difference_ci": ci(diff)}


# ---------------------------------------------------------------------------------------- markdown


def pct(fraction: float) -> str:
    return f"{round(100 * (1 - fraction))}%"


def errors_markdown(errors: dict, router: str, fractions) -> str:
    """Mean-over-layers error (worst layer in brackets) of every row, one column per sparsity."""
    head = "| estimator | " + " | ".join(f"{pct(f)} mean (worst layer)" for f in fractions) + " |"
    lines = [head, "|---|" + "---:|" * len(fractions)]
    for row in ROWS:
        cells = [f"{errors[router][f][row.key]['mean']:.3f} ({errors[router][f][row.key]['worst']:.3f})"
                 for f in fractions]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines.append("| c. exact tail in the shared normaliser (= dense attention) | " + " | ".join(
        ["0 (reference)"] * len(fractions)) + " |")
    return "\n".join(lines)


def headline_markdown(errors: dict, losses: dict, fractions, original_loss: float) -> str:
    """One row per estimator with an error column per sparsity and a held-out loss ratio (95% CI) per sparsity."""
    head = ("| estimator | " + " | ".join(f"attn. error {pct(f)}" for f in fractions) + " | "
            + " | ".join(f"loss ratio {pct(f)} [95% CI]" for f in fractions) + " |")
    lines = [head, "|---|" + "---:|" * (2 * len(fractions))]
    for row in ROWS:
        if not row.loss and row.key not in ("exact_query",):
            continue
        errs = [f"{errors['heuristic'][f][row.key]['mean']:.3f}" for f in fractions]
        if row.loss:
            ratios = [f"{losses[row.key][f]['ratio']:.3f} [{losses[row.key][f]['ratio_ci'][0]:.3f}, "
                      f"{losses[row.key][f]['ratio_ci'][1]:.3f}]" for f in fractions]
        else:
            ratios = ["1 (= dense)"] * len(fractions)
        lines.append(f"| {row.label} | " + " | ".join(errs + ratios) + " |")
    if DENSE_KEY in losses:
        dense = [f"{losses[DENSE_KEY][f]['ratio']:.4f} [{losses[DENSE_KEY][f]['ratio_ci'][0]:.4f}, "
                 f"{losses[DENSE_KEY][f]['ratio_ci'][1]:.4f}]" for f in fractions]
    else:
        dense = ["1 (= dense)"] * len(fractions)
    lines.append("| c. exact tail in the shared normaliser (= dense attention, fp32) | "
                 + " | ".join(["0"] * len(fractions) + dense) + " |")
    lines.append(f"\nOriginal (dense) held-out loss on these samples: {original_loss:.4f}.")
    return "\n".join(lines)
