"""Where does SLA2's attention error come from on the trained original?  Error of each branch choice.

At a given top-k, SLA2 replaces a head's dense output O = P V by alpha O_s + (1 - alpha) O_l (DESIGN §1):
O_s is the exact softmax over the selected key blocks, O_l linear attention with phi = softmax over the
head dim over the other blocks, alpha one number per head.  Exactly, O = m O_s + (1 - m) O_t per query,
where m is the query's dense mass on the selected blocks and O_t = the dense softmax restricted to the
other blocks.  So the error has two sources, and this script separates them on the captured Q, K, V of
every self-attention of the original (before any fine-tuning; the heuristic router's blocks, as after
``slaconv convert``):

* ``sparse only``        alpha = 1: O_s alone;
* ``SLA2``               O_l = phi-linear attention, alpha per head fitted by least squares (the best any
                         per-head alpha can do with this O_l);
* ``SLA2, best phi temperature``  the same with phi(c x), c the best of 0.25 ... 4 for each head;
* ``mean of rest``       O_l = the plain mean of V over the unselected keys (uniform attention), alpha fitted:
                         what the linear branch must beat to be carrying information;
* ``exact tail``         O_l = O_t, alpha fitted per head: the error left by a per-head alpha alone;
* ``linear, row alpha``  O_l = phi-linear, alpha = m per query: the error left by the feature map alone.

Relative L2 against the dense output, mean over heads (and videos, noise levels), per layer.  CPU, ~3 min:

    python benchmarks/quality/branch_errors.py --out /tmp/branch_errors
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import attention_mass  # noqa: E402
import metrics  # noqa: E402
import qcommon as common  # noqa: E402

try:
    from kernels import reference  # noqa: E402
except ImportError:  # pragma: no cover - installed layout
    from slaconv.kernels import reference  # noqa: E402

VARIANTS = ("sparse only", "SLA2", "SLA2, best phi temperature", "mean of rest", "exact tail", "linear, row alpha")
TEMPERATURES = (0.25, 0.5, 2.0, 4.0)  # phi(c x) for c in these (and 1): does a sharper/flatter feature map help?


def heuristic_blocks(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, n_select: int):
    """The blocks ``slaconv convert``'s identity router keeps for one head (q, k (N, D)): the (nq, nk) block
    mask and its (N, N) token expansion."""
    n, d = q.shape
    eye = torch.eye(d, dtype=q.dtype).unsqueeze(0)
    scores = reference.router_scores(q[None, None], k[None, None], eye, eye, block_q, block_k)[0, 0]
    blocks = reference.hard_topk_mask(scores, n_select)
    return blocks, blocks.repeat_interleave(block_q, 0).repeat_interleave(block_k, 1)[:n, :n]


def fitted_alpha(o: torch.Tensor, o_s: torch.Tensor, o_l: torch.Tensor) -> torch.Tensor:
    """argmin over a scalar alpha of ||alpha o_s + (1 - alpha) o_l - o||_F (differentiable)."""
    d = o_s - o_l
    return ((o - o_l) * d).sum() / d.square().sum().clamp_min(1e-30)


def mixed_error(o: torch.Tensor, o_s: torch.Tensor, o_l: torch.Tensor) -> torch.Tensor:
    """Relative L2 of alpha o_s + (1 - alpha) o_l against ``o``, with the best per-head alpha."""
    a = fitted_alpha(o, o_s, o_l)
    return (a * o_s + (1 - a) * o_l - o).norm() / o.norm()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def branch_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> dict:
    """The exact split of one head's dense output and SLA2's linear branch; q, k, v (N, D), keep (N, N) bool.

    Returns o (dense), m (per-query mass on ``keep``), o_s, o_t (the dense softmax restricted to keep and to
    its complement; o = m o_s + (1 - m) o_t), o_lin (phi-linear attention over the complement) and o_mean
    (the plain mean of V over the complement)."""
    d = q.shape[1]
    p = torch.softmax(q @ k.t() / math.sqrt(d), dim=-1)
    m = (p * keep).sum(dim=-1, keepdim=True)
    rest = (~keep).to(v.dtype)
    return {"o": p @ v, "m": m, "o_s": ((p * keep) @ v) / m, "o_t": ((p * ~keep) @ v) / (1 - m).clamp_min(1e-30),
            "o_lin": linear_branch(q, k, v, keep),
            "o_mean": (rest @ v) / rest.sum(dim=-1, keepdim=True).clamp_min(1.0)}


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """phi-linear attention over the complement of ``keep``, phi = softmax over the head dim of c x."""
    lin = (reference.feature_map(q * c).to(q.dtype) @ reference.feature_map(k * c).to(q.dtype).t()) * ~keep
    return (lin @ v) / (lin.sum(dim=-1, keepdim=True) + 1e-6)


def head_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int,
                n_select: int) -> dict:
    """Relative L2 of each variant for one head (q, k, v are (N, D)), with the heuristic router's blocks."""
    _, keep = heuristic_blocks(q, k, block_q, block_k, n_select)
    br = branch_outputs(q, k, v, keep)
    o, o_s, m = br["o"], br["o_s"], br["m"]
    out = {"selected_mass": float(m.mean()), "sparse only": rel(o_s, o)}
    for name, o_l in (("SLA2", br["o_lin"]), ("mean of rest", br["o_mean"]), ("exact tail", br["o_t"])):
        out[name] = float(mixed_error(o, o_s, o_l))
        out[f"alpha {name}"] = float(fitted_alpha(o, o_s, o_l))
    out["linear, row alpha"] = rel(m * o_s + (1 - m) * br["o_lin"], o)
    out["SLA2, best phi temperature"] = min(
        [out["SLA2"]] + [float(mixed_error(o, o_s, linear_branch(q, k, v, keep, c))) for c in TEMPERATURES])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "checkpoint" / "model")
    ap.add_argument("--out", type=Path, default=Path("/tmp/branch_errors"))
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--topk", type=float, default=0.03)
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timer = common.Timer()
    spec, _ = common.trained_spec(args.model)
    model = common.load_model(args.model, "cpu")
    n_tokens = spec.tokens(tuple(model.config.patch_size))
    n_select = reference.topk_count(args.topk, reference.block_count(n_tokens, args.block_k))
    records = []
    for sigma in args.sigmas:
        hs = metrics.heldout_set(spec, args.videos, seed=common.HELDOUT_SEED, sigmas=(sigma,))
        with torch.no_grad():
            calls = attention_mass.capture_qk(model, hs, n_tokens, values=True)
        for layer, (q, k, v) in enumerate(calls):
            for b in range(q.shape[0]):
                for h in range(q.shape[1]):
                    rec = head_errors(q[b, h], k[b, h], v[b, h], args.block_q, args.block_k, n_select)
                    records.append({"sigma": sigma, "layer": layer, "video": b, "head": h, **rec})
        print(f"sigma {sigma} done [{timer():.0f} s]", flush=True)

    cols = ["selected_mass", *VARIANTS, "alpha SLA2", "alpha exact tail"]
    lines = ["| layer | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for layer in sorted({r["layer"] for r in records}) + ["all"]:
        rs = [r for r in records if layer == "all" or r["layer"] == layer]
        lines.append(f"| {layer} | " + " | ".join(f"{sum(r[c] for r in rs) / len(rs):.3f}" for c in cols) + " |")
    md = (f"# Attention error by branch choice ({args.model})\n\n"
          f"top-k {args.topk} ({n_select} of {reference.block_count(n_tokens, args.block_k)} key blocks, heuristic "
          f"router), blocks {args.block_q} x {args.block_k}; {args.videos} held-out videos x sigma {args.sigmas}. "
          f"Relative L2 against the dense output, mean over heads; alpha columns = the fitted per-head alpha.\n\n"
          + "\n".join(lines) + f"\n\nRuntime {timer():.0f} s on {args.threads} CPU threads.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md)
    common.write_json(args.out / "results.json", {"settings": {k: str(v) for k, v in vars(args).items()},
                                                   "records": records})
    print(md)


if __name__ == "__main__":
    main()
