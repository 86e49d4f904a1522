"""How concentrated is the trained original's self-attention?  Mass that top-k key blocks capture.

SLA2 keeps, per query block of ``block_q`` (128) queries, ``topk_count(f, n_kblocks)`` key blocks of
``block_k`` (64) keys for exact softmax and sends the rest to the linear branch.  At 8,192 tokens
there are 128 key blocks, so f = 0.10 / 0.05 / 0.03 (90 / 95 / 97 % sparsity) keeps 13 / 6 / 4.
This module measures how much of the DENSE softmax probability mass those blocks can hold:

* it runs a trained original (e.g. the shipped ``benchmarks/quality/checkpoint/model``) on held-out
  noisy videos ``x_t = (1 - sigma) x0 + sigma noise`` (metrics.heldout_set: the benchmark's held-out stream,
  classes, fixed noise) and records the post-norm, post-RoPE Q and K of every self-attention
  (attn1) call by wrapping diffusers' ``dispatch_attention_fn`` in transformer_wan;
* per layer and head it computes P = softmax(Q K^T / sqrt(d)) in fp32 (chunked over query rows),
  pools it into (query block x key block) mass (sum over the block's keys, mean over its queries);
* it reports the mass captured by the k blocks chosen by
  - the ORACLE: the k blocks of largest pooled mass (an upper bound for any block router), and
  - the HEURISTIC: SLA's pooled router, ``slaconv.kernels.reference.router_scores`` with identity
    projections (what ``slaconv convert`` starts from before stage 1 learns the router);
* plus, per query block, how many oracle blocks 90 % of the mass needs and the share of mass that
  stays in the query's own frame (tokens are in (frame, row, column) raster order, as the model and
  the SLA2 kernels see them; ``--tile 8`` re-blocks them into 8 x 8 spatial patches of a frame instead and
  ``--tile 4x4x4`` into 4 x 4 patches over 4 frames, the order ``sla2.token_tile`` gives a converted model), and
  the block-free bound: the mass of each query's own top 3 % keys (every 8th query).

Run (CPU, ~3 min on 2 cores with the defaults):

    python -m slaconv.quality.attention_stats --model MODEL --out OUT                # 4 videos x sigma 0.2/0.5/0.8
    python -m slaconv.quality.attention_stats --model MODEL --tile 4x4x4 --out OUT_TILES
    python -m slaconv.quality.attention_stats --model MODEL --frames 16 --videos 2 --out OUT_16F

``--frames 16`` runs the same model on 16-frame videos (16,384 tokens, 256 key blocks): a longer
sequence than it was trained on (8 frames), as a comparison point only.  Writes ``--out``/results.md
(the tables) and results.json (every per-head number).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from slaconv.errors import RecipeError
from slaconv.kernels import reference
from slaconv.quality import common, metrics
from slaconv.quality.command_line import fraction, one_line_errors, positive_int
from slaconv.token_order import describe, parse_tile, tile_permutation

SPARSITIES = (0.10, 0.05, 0.03)  # top-k fractions: 90 / 95 / 97 % sparsity


# ---------------------------------------------------------------------------------------- capture


_TOKEN_ORDER: list[torch.Tensor] = []  # the order set by tile_order_context, innermost last


@contextmanager
def tile_order_context(order: torch.Tensor | None):
    """Within the block, :func:`self_attention_hook`'s hooks see Q, K and V with their tokens in ``order`` (raster
    indices in sequence order, :func:`slaconv.token_order.tile_permutation`) and a replacement output they
    return is put back in raster order: the attention a converted model with ``sla2.token_tile`` computes,
    exact because attention is permutation-equivariant.  None: raster order."""
    if order is None:
        yield
        return
    _TOKEN_ORDER.append(order)
    try:
        yield
    finally:
        _TOKEN_ORDER.pop()


@contextmanager
def self_attention_hook(n_tokens: int, hook):
    """Call ``hook(index, query, key, value)`` at every attention call whose key length is ``n_tokens``.

    diffusers 0.42's WanAttnProcessor calls ``transformer_wan.dispatch_attention_fn(query, key, ...)``
    with (B, N, H, D) tensors after norm_q/norm_k and RoPE; cross-attention keys are the 4 class tokens,
    so the key length picks the self-attention (attn1) calls.  ``index`` counts those calls from 0 (in
    layer order, forward after forward).  The hook returns None to keep the layer's own attention output,
    or a (B, N, H, D) tensor that replaces it.  Inside :func:`tile_order_context` the tokens are in tile order.
    """
    from diffusers.models.transformers import transformer_wan as tw

    original = tw.dispatch_attention_fn
    count = 0

    def wrapped(query, key, value, *args, **kwargs):
        nonlocal count
        if key.shape[1] == n_tokens:
            index, count = count, count + 1
            if _TOKEN_ORDER:
                order = _TOKEN_ORDER[-1].to(query.device)
                out = hook(index, *(x[:, order] for x in (query, key, value)))
                if out is not None:
                    return out[:, torch.argsort(order)]
            else:
                out = hook(index, query, key, value)
            if out is not None:
                return out
        return original(query, key, value, *args, **kwargs)

    tw.dispatch_attention_fn = wrapped
    try:
        yield
    finally:
        tw.dispatch_attention_fn = original


@contextmanager
def record_self_attention(n_tokens: int, values: bool = False):
    """Record (q, k) -- or (q, k, v) with ``values`` -- of every attention call whose key length is ``n_tokens``.

    Yields a list that fills with tuples in (B, H, N, D) fp32 layout, in layer order (see
    :func:`self_attention_hook`).
    """
    calls: list[tuple[torch.Tensor, ...]] = []

    def keep(index, query, key, value):
        kept = (query, key, value) if values else (query, key)
        calls.append(tuple(x.detach().float().transpose(1, 2).contiguous() for x in kept))

    with self_attention_hook(n_tokens, keep):
        yield calls


@torch.no_grad()
def capture_qk(model, hs: dict, n_tokens: int, values: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (q, k) -- (q, k, v) with ``values`` --, each (B, H, N, D), for the held-out batch ``hs``."""
    s = hs["sigma"]
    x_t = (1 - s.view(-1, 1, 1, 1, 1)) * hs["x0"] + s.view(-1, 1, 1, 1, 1) * hs["noise"]
    with record_self_attention(n_tokens, values) as calls:
        common.velocity(model, x_t, s, hs["emb"])
    if len(calls) != len(model.blocks):
        raise RuntimeError(f"captured {len(calls)} self-attention calls, expected {len(model.blocks)}")
    return calls


# ---------------------------------------------------------------------------------------- measure


def block_mass(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int,
               rows_per_chunk: int = 1024) -> torch.Tensor:
    """Dense attention mass pooled into blocks for one head: q, k (N, D) -> (n_qblocks, n_kblocks).

    Entry (i, j) = sum over key block j of softmax(q k^T / sqrt(d)), averaged over query block i's rows.
    """
    n, d = q.shape
    if n % block_q or n % block_k:
        raise ValueError(f"{n} tokens do not tile into {block_q}/{block_k} blocks")
    rows_per_chunk -= rows_per_chunk % block_q
    kt = k.t() / math.sqrt(d)
    out = []
    for start in range(0, n, rows_per_chunk):
        p = torch.softmax(q[start : start + rows_per_chunk] @ kt, dim=-1)  # (r, N)
        r = p.shape[0]
        out.append(p.view(r // block_q, block_q, n // block_k, block_k).sum(dim=3).mean(dim=1))
    return torch.cat(out)


def token_topk_mass(q: torch.Tensor, k: torch.Tensor, fractions, row_stride: int = 8,
                    rows_per_chunk: int = 1024) -> tuple[list[float], float]:
    """Mean over queries of the mass of each query's own top ``f * N`` KEYS (no blocks): (N, D) q, k; and the
    share of attention weights above the row average 1/N (the SLA paper's statistic: ~8.1% on Wan2.1).

    The bound for a per-token router at the same key budget; estimated on every ``row_stride``-th query.
    """
    n, d = q.shape
    counts = [max(1, round(f * n)) for f in fractions]
    kt = k.t() / math.sqrt(d)
    rows = q[::row_stride]
    totals = [0.0] * len(counts)
    above = 0.0
    for start in range(0, rows.shape[0], rows_per_chunk):
        p = torch.softmax(rows[start : start + rows_per_chunk] @ kt, dim=-1)
        above += float((p > 1.0 / n).float().mean(dim=-1).sum())
        top = p.topk(max(counts), dim=-1).values.cumsum(dim=-1)  # (r, max count), descending mass
        for i, c in enumerate(counts):
            totals[i] += float(top[:, c - 1].sum())
    return [t / rows.shape[0] for t in totals], above / rows.shape[0]


def stable_rank(a: torch.Tensor, iters: int = 30) -> float:
    """||A||_F^2 / sigma_max(A)^2, with sigma_max from power iteration on A^T A (seeded start vector)."""
    v = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(0), dtype=a.dtype).to(a.device)
    sigma2 = 0.0
    for _ in range(iters):
        w = a.t() @ (a @ v)
        sigma2 = float(w.norm())
        v = w / sigma2
    return float(a.square().sum()) / sigma2


def tail_stable_ranks(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int,
                      n_select: int) -> tuple[float, float]:
    """Stable rank of the full map P and of its tail P * (1 - M), M = the oracle's ``n_select`` blocks per row.

    The SLA paper's case for the linear branch: on Wan2.1 the full map has stable rank ~6,200 and the
    part outside the top 8 % only ~9, so a low-rank (linear) attention can stand in for it.
    """
    n, d = q.shape
    p = torch.softmax(q @ (k.t() / math.sqrt(d)), dim=-1)  # (N, N) fp32
    mass = p.view(n // block_q, block_q, n // block_k, block_k).sum(dim=3).mean(dim=1)
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(n_select, dim=-1).indices, True)
    full = stable_rank(p)
    mask = keep.repeat_interleave(block_q, dim=0).repeat_interleave(block_k, dim=1)
    return full, stable_rank(p.masked_fill_(mask, 0.0))


def tile_argument(text: str) -> tuple[int, int, int]:
    """``--tile``: ``N`` (N x N patches of one frame) or ``FxHxW`` (:func:`slaconv.token_order.parse_tile`)."""
    try:
        return (1, int(text), int(text)) if text.strip().isdigit() and int(text) > 0 else parse_tile(text)
    except RecipeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def captured_mass(mass: torch.Tensor, scores: torch.Tensor, n_select: int) -> float:
    """Mean over query blocks of the mass held by the ``n_select`` best-scoring key blocks of each row."""
    idx = torch.topk(scores, n_select, dim=-1).indices
    return float(mass.gather(-1, idx).sum(dim=-1).mean())


def top_p_captured_mass(mass: torch.Tensor, scores: torch.Tensor, n_select: int) -> tuple[float, float]:
    """Top-p selection at the top-k budget: each query block keeps its best-scoring key blocks until their
    estimated share (softmax of ``scores`` over the row) reaches p, one p for the whole map, set by bisection
    so the mean count is the first at or above ``n_select``.  Returns (mean true ``mass`` held, mean count):
    how much a per-query-block budget would gain over the same number of blocks spent evenly."""
    est, order = torch.softmax(scores.float(), dim=-1).sort(dim=-1, descending=True)
    cum_est = est.cumsum(dim=-1)
    nk = mass.shape[-1]

    def counts(p: float) -> torch.Tensor:
        return ((cum_est < p).sum(dim=-1) + 1).clamp(max=nk)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if counts(mid).float().mean() < n_select:
            lo = mid
        else:
            hi = mid
    kept = counts(hi)
    held = mass.gather(-1, order).cumsum(dim=-1).gather(-1, (kept - 1).unsqueeze(-1))
    return float(held.mean()), float(kept.float().mean())


def blocks_for(mass: torch.Tensor, share: float = 0.9) -> float:
    """Mean over query blocks of the number of (oracle-ordered) key blocks needed to reach ``share``."""
    cum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return float(((cum < share).sum(dim=-1) + 1).float().mean())


def own_frame_mass(mass: torch.Tensor, block_q: int, block_k: int, tokens_per_frame: int,
                   order: torch.Tensor | None = None) -> float:
    """Mean share of a query block's mass on key blocks of its own frame, a block's frame being that of its first
    token: in raster (frame, row, col) order, or in ``order`` (raster indices in sequence order) when given."""
    nq, nk = mass.shape
    n = nk * block_k
    frames = (torch.arange(n) if order is None else order.cpu()) // tokens_per_frame
    fq, fk = frames[::block_q][:nq].to(mass.device), frames[::block_k][:nk].to(mass.device)
    return float((mass * (fq[:, None] == fk[None, :])).sum(dim=-1).mean())


def measure_head(q: torch.Tensor, k: torch.Tensor, args, tokens_per_frame: int,
                 mass: torch.Tensor | None = None, order: torch.Tensor | None = None) -> dict:
    """All numbers for one (layer, video, sigma, head): q, k are (N, D), in the token ``order`` when one is given
    (raster indices in sequence order); ``mass`` is their :func:`block_mass` when the caller has it already."""
    n = q.shape[0]
    nk = reference.block_count(n, args.block_k)
    if mass is None:
        mass = block_mass(q, k, args.block_q, args.block_k)
    eye = torch.eye(q.shape[1], device=q.device).unsqueeze(0)
    heur = reference.router_scores(q[None, None], k[None, None], eye, eye, args.block_q, args.block_k)[0, 0]
    rec = {"blocks_for_90": blocks_for(mass, 0.9),
           "own_frame": own_frame_mass(mass, args.block_q, args.block_k, tokens_per_frame, order)}
    for f in SPARSITIES:
        n_sel = reference.topk_count(f, nk)
        rec[f"oracle_{f:g}"] = captured_mass(mass, mass, n_sel)
        rec[f"heuristic_{f:g}"] = captured_mass(mass, heur, n_sel)
    if args.top_p:
        for f in SPARSITIES:
            n_sel = reference.topk_count(f, nk)
            rec[f"topp_oracle_{f:g}"], rec[f"topp_oracle_count_{f:g}"] = top_p_captured_mass(
                mass, mass.clamp_min(1e-30).log(), n_sel)
            rec[f"topp_heuristic_{f:g}"], rec[f"topp_heuristic_count_{f:g}"] = top_p_captured_mass(mass, heur, n_sel)
            # the most any spread of the same total over the query blocks can hold: the map's largest entries
            rec[f"spread_oracle_{f:g}"] = float(mass.flatten().topk(mass.shape[0] * n_sel).values.sum() / mass.shape[0])
    if args.tail_rank:
        rec["rank_full"], rec["rank_tail"] = tail_stable_ranks(q, k, args.block_q, args.block_k,
                                                               reference.topk_count(SPARSITIES[-1], nk))
    if args.token_topk:  # token order does not matter here
        masses, rec["above_mean"] = token_topk_mass(q, k, SPARSITIES)
        for f, m in zip(SPARSITIES, masses):
            rec[f"token_{f:g}"] = m
    return rec


# ---------------------------------------------------------------------------------------- report


COLUMNS = ([f"oracle_{f:g}" for f in SPARSITIES] + [f"heuristic_{f:g}" for f in SPARSITIES]
           + ["blocks_for_90", "own_frame"])
TOKEN = f"token_{SPARSITIES[-1]:g}"  # optional columns: per-query top 3 % keys, no blocks,
TOKEN_COLUMNS = (TOKEN, "above_mean")  # and the share of weights above 1/N
RANK_COLUMNS = ("rank_full", "rank_tail")  # optional: stable rank of the map and of its 97 % tail
TOP_P_COLUMNS = tuple(f"topp_{kind}{part}_{f:g}" for kind in ("oracle", "heuristic") for part in ("", "_count")
                      for f in SPARSITIES) + tuple(f"spread_oracle_{f:g}" for f in SPARSITIES)
# optional: the same budgets spent by top-p, and the best spread of them over the query blocks


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(records: list[dict], key: str) -> dict:
    """Per value of ``key`` (and "all"): mean of every column, plus the worst head's mean at 97 %."""
    groups = sorted({r[key] for r in records}) + ["all"]
    out = {}
    for g in groups:
        rs = [r for r in records if g == "all" or r[key] == g]
        row = {c: mean(r[c] for r in rs)
               for c in COLUMNS + list(TOKEN_COLUMNS) + list(RANK_COLUMNS) + list(TOP_P_COLUMNS) if c in rs[0]}
        heads = {(r["layer"], r["head"]) for r in rs}
        per_head = {h: [r for r in rs if (r["layer"], r["head"]) == h] for h in heads}
        for c in (f"oracle_{SPARSITIES[-1]:g}", f"heuristic_{SPARSITIES[-1]:g}"):
            row[f"min_head_{c}"] = min(mean(r[c] for r in v) for v in per_head.values())
        out[str(g)] = row
    return out


def table(summary: dict, first: str, kcounts: list[int]) -> str:
    pct = [f"{round(100 * (1 - f))}%" for f in SPARSITIES]
    head = ([first] + [f"oracle {p} (k={k})" for p, k in zip(pct, kcounts)]
            + [f"heuristic {p}" for p in pct]
            + [f"min head oracle {pct[-1]}", f"min head heur. {pct[-1]}", "blocks for 90% mass", "own-frame mass"])
    token = TOKEN in next(iter(summary.values()))
    head += [f"per-token top {round(100 * SPARSITIES[-1])}% keys", "weights above 1/N"] if token else []
    rank = "rank_tail" in next(iter(summary.values()))
    head += ["stable rank, map", f"stable rank, {pct[-1]} tail"] if rank else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cols = COLUMNS[:6] + [f"min_head_oracle_{SPARSITIES[-1]:g}", f"min_head_heuristic_{SPARSITIES[-1]:g}"]
    for g, row in summary.items():
        cells = [f"{row[c]:.3f}" for c in cols] + [f"{row['blocks_for_90']:.1f}", f"{row['own_frame']:.3f}"]
        cells += [f"{row[TOKEN]:.3f}", f"{row['above_mean']:.3f}"] if token else []
        cells += [f"{row['rank_full']:.1f}", f"{row['rank_tail']:.1f}"] if rank else []
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_p_table(summary: dict, first: str, kcounts: list[int]) -> str:
    """Top-k against top-p at the same mean number of key blocks, oracle and heuristic scores."""
    pct = [f"{round(100 * (1 - f))}%" for f in SPARSITIES]
    head = ([first] + [f"{kind} {p} (k={k}): top-k / top-p (blocks)" for kind in ("oracle", "heuristic")
                       for p, k in zip(pct, kcounts)] + [f"best spread {p}" for p in pct])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, row in summary.items():
        cells = [f"{row[f'{kind}_{f:g}']:.3f} / {row[f'topp_{kind}_{f:g}']:.3f} ({row[f'topp_{kind}_count_{f:g}']:.2f})"
                 for kind in ("oracle", "heuristic") for f in SPARSITIES]
        cells += [f"{row[f'spread_oracle_{f:g}']:.3f}" for f in SPARSITIES]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the original's model folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.md and results.json")
    ap.add_argument("--videos", type=positive_int, default=4)
    ap.add_argument("--sigmas", type=fraction, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--seed", type=int, default=common.HELDOUT_SEED, help="SynthVideo stream (1 = held-out)")
    ap.add_argument("--frames", type=positive_int, default=None, help="override the trained spec's frame count")
    ap.add_argument("--block-q", type=positive_int, default=128)
    ap.add_argument("--block-k", type=positive_int, default=64)
    ap.add_argument("--tile", type=tile_argument, default=None,
                    help="reorder tokens into tiles before blocking: N (N x N patches of a frame) or FxHxW "
                         "(F frames x H rows x W columns); default raster order")
    ap.add_argument("--token-topk", action=argparse.BooleanOptionalAction, default=True,
                    help="also the block-free per-query top-k key mass (every 8th query)")
    ap.add_argument("--tail-rank", action=argparse.BooleanOptionalAction, default=True,
                    help="also the stable rank of the dense map and of what the 97%% oracle blocks leave out")
    ap.add_argument("--top-p", action=argparse.BooleanOptionalAction, default=False,
                    help="also the mass that top-p selection holds at each top-k budget (one p per head map, "
                         "set so the mean count matches)")
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timer = common.Timer()

    spec, _ = common.trained_spec(args.model)
    if args.frames:
        spec = dataclasses.replace(spec, frames=args.frames)
    model = common.load_model(args.model, "cpu")
    patch = tuple(model.config.patch_size)
    n_tokens = spec.tokens(patch)
    tokens_per_frame = n_tokens // (spec.frames // patch[0])
    nk = reference.block_count(n_tokens, args.block_k)
    kcounts = [reference.topk_count(f, nk) for f in SPARSITIES]
    if n_tokens % args.block_q or n_tokens % args.block_k:
        ap.error(f"{n_tokens} tokens do not tile into --block-q {args.block_q} / --block-k {args.block_k} blocks")
    grid = (spec.frames // patch[0], spec.size // patch[1], spec.size // patch[2])
    order = tile_permutation(grid, args.tile) if args.tile else None
    order_name = describe(args.tile)
    print(f"{spec.frames} frames x {spec.size}^2 -> {n_tokens} tokens, {nk} key blocks; keep {kcounts}; "
          f"token order {order_name}")

    records = []
    for sigma in args.sigmas:
        hs = metrics.heldout_set(spec, args.videos, seed=args.seed, sigmas=(sigma,))  # same x0/noise per sigma
        with tile_order_context(order):
            layers = capture_qk(model, hs, n_tokens)
        for layer, (q, k) in enumerate(layers):
            for b in range(q.shape[0]):
                for h in range(q.shape[1]):
                    rec = measure_head(q[b, h], k[b, h], args, tokens_per_frame, order=order)
                    records.append({"sigma": sigma, "video": b, "layer": layer, "head": h, **rec})
            last = [r for r in records if r["sigma"] == sigma and r["layer"] == layer]
            print(f"sigma {sigma} layer {layer}: oracle 97% {mean(r['oracle_0.03'] for r in last):.3f}, "
                  f"heuristic 97% {mean(r['heuristic_0.03'] for r in last):.3f}  [{timer():.0f} s]", flush=True)

    by_layer, by_sigma = summarize(records, "layer"), summarize(records, "sigma")
    md = (f"# Attention mass captured by top-k key blocks ({args.model})\n\n"
          f"{args.videos} held-out videos (stream {args.seed}) x sigma {args.sigmas}; {spec.frames} frames x "
          f"{spec.size}x{spec.size} = {n_tokens} tokens ({order_name} "
          f"order); blocks {args.block_q} q x {args.block_k} k, {nk} key "
          f"blocks per row.  Mean over heads, videos and sigmas; min head = the head (layer, head) with the "
          f"lowest mean.\n\n## By layer\n\n{table(by_layer, 'layer', kcounts)}\n\n"
          f"## By noise level (all layers)\n\n{table(by_sigma, 'sigma', kcounts)}\n\n"
          + (f"## Top-k against top-p at the same budget\n\nPer query block, the best-scoring key blocks until "
             f"their estimated share (softmax of the scores over the row) reaches p, one p per head map set so the "
             f"mean count (in brackets) is the first at or above k; best spread: the most mass any split of the "
             f"same total over the query blocks holds (the map's largest entries).\n\n{top_p_table(by_layer, 'layer', kcounts)}\n\n"
             if args.top_p else "")
          + f"Runtime {timer():.0f} s on {args.threads} CPU threads.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md)
    common.write_json(args.out / "results.json", {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "tokens": n_tokens, "key_blocks": nk, "kept_blocks": dict(zip(map(str, SPARSITIES), kcounts)),
                     "spec": spec.to_dict()},
        "by_layer": by_layer, "by_sigma": by_sigma, "records": records, "seconds": timer()})
    print(md)


if __name__ == "__main__":
    main()
