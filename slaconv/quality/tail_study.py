"""How good must a tail estimator be, and does alpha-mixing itself cap quality?  Measured on a trained original,
before any fine-tuning.

At 90 / 95 / 97 % sparsity (block_q 128, block_k 64; the identity router ``slaconv convert`` starts from picks
the blocks) every self-attention output of the original is replaced by one estimator at a time
(:mod:`slaconv.quality.tail_report` lists them: the exact tail under per-head, per-query-block and per-query
alpha; SLA2's linear branch; the plain mean of the unselected values; a pooled tail inside the shared softmax
normaliser, with and without a learned per-head logit bias; a Hedgehog feature map).  Reported:

1. statistics of the original's attention per layer (``attention_stats.measure_head``: top-k block mass for
   the oracle and the identity router, weights above 1/N, stable rank of the map and of its 97 % tail) on
   ``--stats-videos`` held-out samples, plus the distribution over queries of the mass the router's blocks
   hold, on every held-out sample;
2. the relative L2 error of each estimator against dense attention, on the original's own Q, K, V of every
   layer (the identity router; the oracle router's blocks as a second column on the statistics samples);
   alphas are fitted by least squares on these held-out samples themselves (a floor for any method with that
   alpha granularity);
3. the held-out flow-matching loss of the whole model with the estimator in every self-attention layer,
   paired with the original's loss on the same (video, noise, sigma) samples, with bootstrap 95% intervals.

The pooled bias and the Hedgehog maps are fitted on ``--train-videos`` samples of the training stream (all
noise levels, every layer; one map per layer shared by the three sparsities), and evaluated on held-out ones.

    python -m slaconv.quality.tail_study --model benchmarks/quality/checkpoint/model --out OUT

``--device cuda`` runs the model under bf16 autocast (as the quality table does) and every estimator in fp32.
``--max-minutes`` time-boxes the run: the Hedgehog fits stop early, fewer held-out samples get errors and
fewer get the loss forwards, rather than the run overrunning (results.json records what was used).
``--fractions`` picks a subset of the three top-k fractions.  Writes OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from slaconv.kernels import reference
from slaconv.quality import attention_stats as am
from slaconv.quality import common, metrics
from slaconv.quality import tail_estimators as te
from slaconv.quality import tail_fit as tf
from slaconv.quality import tail_mixing as tm
from slaconv.quality import tail_report as tr
from slaconv.quality.command_line import fraction, non_negative_int, one_line_errors, positive_float, positive_int
from slaconv.token_order import describe, tile_permutation

FRACTIONS = (0.10, 0.05, 0.03)  # top-k fractions: 90 / 95 / 97 % sparsity
TRAIN_SIGMAS = (0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4)  # training sample i at TRAIN_SIGMAS[i % 8]
SLA_PAPER_ABOVE_MEAN = 0.081  # share of attention weights above 1/N the SLA paper reports for Wan2.1
# Shares of --max-minutes by which each phase must end: fits, attention errors, loss forwards.
FIT_SHARE, ERROR_SHARE, LOSS_SHARE = 0.30, 0.55, 0.95


class Budget:
    """Points in time, as shares of a wall-clock budget in minutes; ``None`` minutes sets no limit."""

    def __init__(self, minutes: float | None):
        self.start = time.monotonic()
        self.seconds = None if minutes is None else 60.0 * minutes

    def until(self, share: float) -> float | None:
        """The ``time.monotonic()`` value by which ``share`` of the budget is spent (None without a budget)."""
        return None if self.seconds is None else self.start + share * self.seconds

    def left(self, share: float) -> float:
        """Seconds until ``share`` of the budget is spent (infinite without a budget)."""
        return math.inf if self.seconds is None else self.until(share) - time.monotonic()


def sample(hs: dict, i: int, device="cpu") -> dict:
    """Sample ``i`` of a held-out-style set, as a batch of one on ``device``."""
    return {key: val[i : i + 1].to(device) for key, val in hs.items()}


def tail_output(kind: str, q, k, v, lut, o_s, lse_s, dense, params: dict, block_q: int, block_k: int):
    """The tail of one estimator (before mixing), or for the pooled kinds the whole output."""
    if kind == "exact":
        return te.exact_tail(*dense, o_s, lse_s)[0]
    if kind in ("pooled", "pooled_bias"):
        t, gap = te.pooled_parts(q, k, v, lut, lse_s, block_q, block_k)
        return te.pooled_mix(o_s, t, gap, params["bias"] if kind == "pooled_bias" else 0.0)
    over_all = kind.endswith("_all")  # the linear branch over every key block, selected ones included
    kind = kind.removesuffix("_all")
    if kind == "linear":
        fq, fk = te.softmax_features(q), te.softmax_features(k)
    elif kind == "mean":
        fq, fk = te.constant_features(q), te.constant_features(k)
    else:  # hedgehog, hedgehog_one
        wq, wk = params[kind]
        fq, fk = te.hedgehog_features(q, wq), te.hedgehog_features(k, wk)
    return te.kernel_tail(fq, fk, v, lut, block_q, block_k, over_all=over_all)


# ---------------------------------------------------------------------------------------- fitting


def fit_parameters(model, spec, n_tokens: int, counts: dict, args, budget: Budget, log) -> tuple[dict, dict]:
    """Per layer and fraction the pooled bias, per layer the two Hedgehog maps (all training samples / the
    first one); and a summary of the fits.  Each layer's Hedgehog fits share what is left of the fit budget
    equally with the layers after it (four fifths of a layer's share to the fit on all samples)."""
    ts = metrics.heldout_set(spec, args.train_videos, seed=common.TRAIN_SEED, sigmas=TRAIN_SIGMAS)
    g = torch.Generator().manual_seed(args.seed)
    per_layer: list[list[tf.FitRows]] = [[] for _ in model.blocks]
    for i in range(args.train_videos):
        for layer, (q, k, v) in enumerate(am.capture_qk(model, sample(ts, i, args.device), n_tokens, values=True)):
            per_layer[layer].append(tf.fit_rows(q, k, v, counts, args.block_q, args.block_k, args.fit_blocks, g))
        log(f"training sample {i} (sigma {float(ts['sigma'][i]):.2f}) captured")
    params, summary = {}, {}
    for layer, data in enumerate(per_layer):
        p = {"bias": {f: tf.fit_pooled_bias(data, f, args.block_q, args.block_k) for f in args.fractions}}
        share = budget.left(FIT_SHARE) / (len(per_layer) - layer)
        fit = {}
        for name, subset, part in (("hedgehog", data, 0.8), ("hedgehog_one", data[:1], 0.2)):
            stop_at = None if math.isinf(share) else time.monotonic() + part * share
            wq, wk, curve = tf.train_hedgehog(subset, args.hedgehog_width, args.fractions, args.block_q,
                                              args.block_k, args.hedgehog_steps, args.hedgehog_lr, seed=args.seed,
                                              stop_at=stop_at)
            p[name], fit[name] = (wq, wk), {"first": curve[0], "last": curve[-1], "steps": len(curve),
                                            "curve": curve[:: max(1, len(curve) // 10)]}
        p["query_alpha"] = tm.fit_layer(data, p["hedgehog"], args.fractions, args.block_q, args.block_k)
        params[layer] = p
        last = args.fractions[-1]
        summary[layer] = {"pooled_bias": {str(f): p["bias"][f].tolist() for f in args.fractions}, "hedgehog_fit": fit,
                          "query_alpha": {str(f): {t: {m: x.tolist() for m, x in per.items()} for t, per in by.items()}
                                          for f, by in p["query_alpha"].items()}}
        log(f"layer {layer} fitted: pooled bias {tr.pct(last)} {[round(x, 2) for x in p['bias'][last].tolist()]}, "
            f"Hedgehog training loss {fit['hedgehog']['first']:.3f} -> {fit['hedgehog']['last']:.3f} in "
            f"{fit['hedgehog']['steps']} steps")
    return params, summary


# ---------------------------------------------------------------------------------------- errors


def new_cell() -> dict:
    return {"stats": {t: [] for t in tr.MIXED_TAILS}, "direct": {t: [] for t in tr.DIRECT_ROWS},
            "mass": [], "m": []}


def measure_layer(q, k, v, luts: dict, params: dict, cells: dict, block_q: int, block_k: int) -> None:
    """Add one sample's statistics of one layer to ``cells[(router, fraction)]``; luts maps the same keys."""
    dense = te.dense_attention(q, k, v)
    o = dense[0]
    for key, lut in luts.items():
        cell = cells.setdefault(key, new_cell())
        o_s, lse_s = te.sparse_branch(q, k, v, lut, block_q, block_k)
        m = te.exact_tail(*dense, o_s, lse_s)[1]
        cell["mass"].append(m[0, :, :, 0].mean(dim=-1))
        cell["m"].append(m.flatten())
        tails = {}
        for kind in tr.MIXED_TAILS:
            tails[kind] = tail_output(kind, q, k, v, lut, o_s, lse_s, dense, params, block_q, block_k)
            cell["stats"][kind].append(te.mix_stats(o, o_s, tails[kind], block_q))
        gap = tm.mass_gap(q, k, lut, lse_s, block_q, block_k)
        gap_block = tm.block_mass_gap(q, k, lut, lse_s, block_q, block_k)
        for name, err in tm.measure(o, o_s, tails, gap, params["query_alpha"][key[1]], block_q, q,
                                    gap_block).items():
            cell["direct"][name].append(err)
        for kind in tr.SHARED_TAILS:
            est = tail_output(kind, q, k, v, lut, o_s, lse_s, dense, {"bias": params["bias"][key[1]]}, block_q,
                              block_k)
            cell["direct"][kind].append(te.squared_error_per_block(o, est, block_q))


def stack_cell(cell: dict) -> dict:
    """Lists over samples -> tensors (S, H, nq); the mean selected mass per head."""
    stats = {t: {k: torch.cat([s[k] for s in v]) for k in v[0]} for t, v in cell["stats"].items()}
    direct = {t: torch.cat(v) for t, v in cell["direct"].items()}
    m = torch.cat(cell["m"]).cpu()
    quantiles = torch.quantile(m[torch.randperm(m.numel(), generator=torch.Generator().manual_seed(0))[:200_000]],
                               torch.tensor([0.1, 0.5, 0.9]))
    return {"stats": stats, "direct": direct, "mass_mean": torch.stack(cell["mass"]).mean(dim=0),
            "m_quantiles": quantiles.tolist()}


# ---------------------------------------------------------------------------------------- loss


def replaced_output(row: tr.Row, fraction: float, count: int, layer_params: dict, alphas: dict, args):
    """The hook that puts ``row``'s estimator in place of every self-attention output."""

    def hook(index, query, key, value):
        layer = index % len(alphas)
        q, k, v = (x.float().transpose(1, 2).contiguous() for x in (query, key, value))
        with torch.autocast(q.device.type, enabled=False):  # the estimator in fp32 even under the model's autocast
            lut = te.heuristic_lut(q, k, count, args.block_q, args.block_k)
            o_s, lse_s = te.sparse_branch(q, k, v, lut, args.block_q, args.block_k)
            dense = te.dense_attention(q, k, v) if row.tail == "exact" else None
            p = {**layer_params[layer], "bias": layer_params[layer]["bias"][fraction]}
            out = tail_output(row.tail, q, k, v, lut, o_s, lse_s, dense, p, args.block_q, args.block_k)
            if row.mixing != "shared":
                out = te.mix(o_s, out, alphas[layer][row.key].float())
        return out.transpose(1, 2).to(query.dtype)

    return hook


# ---------------------------------------------------------------------------------------- main


def dense_output(query, key, value):
    """A hook that puts the study's own fp32 dense attention in place of every self-attention output: the
    loss of the exact estimators' limit through the same code path (bf16 vs fp32 attention is its only change)."""
    q, k, v = (x.float().transpose(1, 2).contiguous() for x in (query, key, value))
    with torch.autocast(q.device.type, enabled=False):
        out = te.dense_attention(q, k, v)[0]
    return out.transpose(1, 2).to(query.dtype)


def loss_sample_count(model, hs: dict, n_tokens: int, n_sets: int, budget: Budget, args, log) -> int:
    """How many held-out samples the loss forwards can afford: ``n_sets`` passes over them must end by
    ``LOSS_SHARE`` of the budget.  Times one forward with the dense hook (the dearest one); at least 2."""
    n = hs["sigma"].numel()
    if budget.seconds is None:
        return n
    start = time.monotonic()
    with am.self_attention_hook(n_tokens, lambda index, *qkv: dense_output(*qkv)):
        metrics.heldout_losses(model, sample(hs, 0), args.device, batch_size=1)
    per_forward = time.monotonic() - start
    afford = int(budget.left(LOSS_SHARE) / (1.1 * per_forward * n_sets))
    log(f"one replaced forward {per_forward:.2f} s: {n_sets} loss passes afford {afford} samples")
    return max(min(2, n), min(n, afford))


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the original's model folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.md and results.json")
    ap.add_argument("--heldout", type=positive_int, default=5, help="held-out samples (sigma cycles 0.15 ... 0.95)")
    ap.add_argument("--stats-videos", type=non_negative_int, nargs="*", default=[1, 3],
                    help="held-out sample indices that also get the attention statistics and the oracle router")
    ap.add_argument("--fractions", type=fraction, nargs="+", default=list(FRACTIONS),
                    help="top-k fractions (0.10 0.05 0.03 = 90 / 95 / 97 %% sparsity)")
    ap.add_argument("--train-videos", type=positive_int, default=8, help="training samples for the fitted estimators")
    ap.add_argument("--fit-blocks", type=positive_int, default=16, help="query blocks per training sample and layer")
    ap.add_argument("--hedgehog-width", type=positive_int, default=32, help="columns of W: 2x this many features")
    ap.add_argument("--hedgehog-steps", type=positive_int, default=60)
    ap.add_argument("--hedgehog-lr", type=positive_float, default=3e-2)
    ap.add_argument("--no-loss", action="store_true", help="attention errors only, no replaced forwards")
    ap.add_argument("--max-minutes", type=positive_float, default=None,
                    help="wall-clock budget: shortens the Hedgehog fits and the held-out sets to end in time")
    ap.add_argument("--block-q", type=positive_int, default=128)
    ap.add_argument("--block-k", type=positive_int, default=64)
    ap.add_argument("--tile", type=am.tile_argument, default=None,
                    help="tokens in tiles of FxHxW (sla2.token_tile) before blocking; default raster order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (a GPU runs the model under bf16 autocast)")
    args = ap.parse_args(argv)
    args.fractions = sorted(set(args.fractions), reverse=True)
    torch.set_num_threads(args.threads)
    budget = Budget(args.max_minutes)
    timer = common.Timer()

    def log(msg: str) -> None:
        print(f"[{timer():6.0f} s] {msg}", flush=True)

    spec, _ = common.trained_spec(args.model)
    args.device = common.pick_device(args.device)
    model = common.load_model(args.model, args.device)
    patch = tuple(model.config.patch_size)
    n_tokens = spec.tokens(patch)
    try:
        te.check_blocks(n_tokens, args.block_q, args.block_k)
    except ValueError as exc:
        ap.error(str(exc))
    if any(i >= args.heldout for i in args.stats_videos):
        ap.error(f"--stats-videos must be below --heldout {args.heldout}")
    nk = n_tokens // args.block_k
    counts = {f: reference.topk_count(f, nk) for f in args.fractions}
    tokens_per_frame = n_tokens // (spec.frames // patch[0])
    stats_args = SimpleNamespace(block_q=args.block_q, block_k=args.block_k, tail_rank=True, token_topk=True,
                                 top_p=False)
    log(f"{n_tokens} tokens, {nk} key blocks; keep {list(counts.values())} per query block")

    order = tile_permutation((spec.frames // patch[0], spec.size // patch[1], spec.size // patch[2]),
                             args.tile) if args.tile else None
    with am.tile_order_context(order):
        study(model, spec, n_tokens, counts, args, budget, timer, log, stats_args, tokens_per_frame, order)


def study(model, spec, n_tokens, counts, args, budget, timer, log, stats_args, tokens_per_frame, order) -> None:
    """Fit the learned estimators, measure every estimator's attention error and held-out loss, write the
    results (the tokens in ``order`` when one is given)."""
    params, fit_summary = fit_parameters(model, spec, n_tokens, counts, args, budget, log)

    hs = metrics.heldout_set(spec, args.heldout)
    cells: dict = {layer: {} for layer in range(len(model.blocks))}
    head_records, original = [], []
    for i in range(args.heldout):
        if i >= 2 and budget.left(ERROR_SHARE) < 0:
            log(f"error budget spent: {i} of {args.heldout} held-out samples measured")
            break
        with am.record_self_attention(n_tokens, values=True) as calls:
            original.append(metrics.heldout_losses(model, sample(hs, i), args.device, batch_size=1))
        for layer, (q, k, v) in enumerate(calls):
            luts = {("heuristic", f): te.heuristic_lut(q, k, c, args.block_q, args.block_k) for f, c in counts.items()}
            if i in args.stats_videos:
                masses = torch.stack([am.block_mass(q[0, h], k[0, h], args.block_q, args.block_k)
                                      for h in range(q.shape[1])]).unsqueeze(0)
                for h in range(q.shape[1]):
                    rec = am.measure_head(q[0, h], k[0, h], stats_args, tokens_per_frame, mass=masses[0, h],
                                          order=order)
                    head_records.append({"sample": i, "layer": layer, "head": h, **rec})
                luts.update({("oracle", f): te.lut_of(reference.hard_topk_mask(masses, c)) for f, c in counts.items()})
            heuristic = {key: lut for key, lut in luts.items() if key[0] == "heuristic"}
            oracle = {key: lut for key, lut in luts.items() if key[0] == "oracle"}
            measure_layer(q, k, v, heuristic, params[layer], cells[layer], args.block_q, args.block_k)
            if oracle:
                measure_layer(q, k, v, oracle, params[layer], cells[layer], args.block_q, args.block_k)
        common.release_freed_memory()
        log(f"held-out sample {i} (sigma {float(hs['sigma'][i]):.2f}): loss {float(original[-1][0]):.4f}, "
            f"errors measured")
    hs = {key: val[: len(original)] for key, val in hs.items()}
    args.error_samples, args.loss_samples = len(original), 0
    cells = {layer: {key: stack_cell(c) for key, c in per.items()} for layer, per in cells.items()}
    errors = tr.error_table(cells)
    original = torch.cat(original)

    alphas = {}  # per layer and fraction, the fitted alphas of the rows that get a loss
    for layer, per in cells.items():
        for f in args.fractions:
            cell = per[("heuristic", f)]
            alphas[(layer, f)] = {row.key: tr.fitted_alphas(cell["stats"][row.tail], cell["mass_mean"])[row.mixing]
                                  for row in tr.ROWS if row.loss and row.mixing != "shared"}
    losses: dict = {}
    if not args.no_loss:
        loss_rows = [r for r in tr.ROWS if r.loss]
        n_loss = loss_sample_count(model, hs, n_tokens, 1 + len(loss_rows) * len(args.fractions), budget, args, log)
        hs, original = {key: val[:n_loss] for key, val in hs.items()}, original[:n_loss]
        args.loss_samples = n_loss
        with am.self_attention_hook(n_tokens, lambda index, *qkv: dense_output(*qkv)):
            est = metrics.heldout_losses(model, hs, args.device, batch_size=1)
        losses[tr.DENSE_KEY] = {f: {**tr.paired_bootstrap(est, original), "per_sample": est.tolist()}
                                for f in args.fractions}
        log(f"loss of the fp32 dense hook on {n_loss} samples: ratio {losses[tr.DENSE_KEY][args.fractions[0]]['ratio']:.4f}")
        for row in loss_rows:
            for f in args.fractions:
                per_layer = {layer: alphas[(layer, f)] for layer in cells}
                with am.self_attention_hook(n_tokens, replaced_output(row, f, counts[f], params, per_layer, args)):
                    est = metrics.heldout_losses(model, hs, args.device, batch_size=1)
                losses.setdefault(row.key, {})[f] = {**tr.paired_bootstrap(est, original), "per_sample": est.tolist()}
                common.release_freed_memory()
                log(f"loss {row.key} at {tr.pct(f)}: ratio {losses[row.key][f]['ratio']:.3f} "
                    f"{losses[row.key][f]['ratio_ci']}")

    write_results(args, spec, n_tokens, counts, timer, fit_summary, cells, errors, losses, original, hs,
                  head_records, alphas)


def device_words(args) -> str:
    if args.device.type == "cuda":
        return f"{torch.cuda.get_device_name(args.device)} (model under bf16 autocast)"
    return f"CPU ({args.threads} threads)"


def write_results(args, spec, n_tokens, counts, timer, fit_summary, cells, errors, losses, original, hs,
                  head_records, alphas) -> None:
    """results.md (statistics, error tables, loss table) and results.json (everything)."""
    by_layer = am.summarize(head_records, "layer") if head_records else {}
    quantiles = {str(layer): {tr.pct(f): per[("heuristic", f)]["m_quantiles"] for f in args.fractions}
                 for layer, per in cells.items()}
    qlines = ["| layer | " + " | ".join(f"{tr.pct(f)}: p10 / p50 / p90" for f in args.fractions) + " |",
              "|---|" + "---|" * len(args.fractions)]
    for layer, per in quantiles.items():
        qlines.append(f"| {layer} | " + " | ".join(" / ".join(f"{x:.2f}" for x in per[tr.pct(f)]) for f in args.fractions)
                      + " |")
    steps = [fit["hedgehog_fit"]["hedgehog"]["steps"] for fit in fit_summary.values()]
    stats_samples = [i for i in args.stats_videos if i < args.error_samples]
    md = [f"# Tail estimators at fixed sparsity, no training ({args.model})", "",
          f"{datetime.date.today()}, {device_words(args)}, {timer():.0f} s.  {n_tokens} tokens, blocks "
          f"{args.block_q} q x {args.block_k} k, token order {describe(args.tile)}, key blocks kept per query block {list(counts.values())} "
          f"({' / '.join(tr.pct(f) for f in counts)}).  Attention errors on the first {args.error_samples} "
          f"samples of the benchmark's held-out stream (sigma cycling 0.15 ... 0.95), held-out loss on the first "
          f"{args.loss_samples}; statistics and oracle router on samples {stats_samples}; pooled bias and Hedgehog "
          f"maps fitted on {args.train_videos} training samples (sigma {list(TRAIN_SIGMAS[:args.train_videos])}), "
          f"{args.fit_blocks} query blocks each, Hedgehog W {args.hedgehog_width} columns "
          f"({2 * args.hedgehog_width} features), {min(steps)}-{max(steps)} Adam steps per layer at lr "
          f"{args.hedgehog_lr}.", ""]
    if by_layer:
        nk = n_tokens // args.block_k
        kc = [reference.topk_count(f, nk) for f in am.SPARSITIES]
        md += ["## 1. The original's attention", "", am.table(by_layer, "layer", kc), "",
               f"Weights above 1/N, all layers: {100 * by_layer['all']['above_mean']:.1f}% (the SLA paper reports "
               f"{100 * SLA_PAPER_ABOVE_MEAN:.1f}% for Wan2.1).", ""]
    md += ["Mass the identity router's blocks hold, distribution over queries (all held-out samples):", "",
           "\n".join(qlines), ""]
    md += ["## 2. Attention error (relative L2 against dense, mean over layers; worst layer in brackets)", "",
           "Identity router (the converter's):", "", tr.errors_markdown(errors, "heuristic", args.fractions), ""]
    if "oracle" in errors:
        md += [f"Oracle router (samples {stats_samples} only):", "",
               tr.errors_markdown(errors, "oracle", args.fractions), ""]
    if losses:
        md += ["## 3. Held-out loss with the estimator in every self-attention layer", "",
               tr.headline_markdown(errors, losses, args.fractions, float(original.mean())), ""]
    text = "\n".join(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    common.write_json(args.out / "results.json", {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "tokens": n_tokens, "kept_blocks": {str(f): c for f, c in counts.items()},
                     "spec": spec.to_dict(), "env": common.env_summary()},
        "seconds": timer(), "loss_sigma": hs["sigma"].tolist(), "original_losses": original.tolist(),
        "errors": {r: {str(f): v for f, v in per.items()} for r, per in errors.items()},
        "losses": {k: {str(f): v for f, v in per.items()} for k, per in losses.items()},
        "fits": fit_summary, "selected_mass_quantiles": quantiles, "attention_by_layer": by_layer,
        "alphas": {f"{layer}/{f}": {k: v.tolist() for k, v in a.items()} for (layer, f), a in alphas.items()},
        "head_records": head_records})
    print(text)


if __name__ == "__main__":
    main()
