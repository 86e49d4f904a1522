"""Could a learned feature map make SLA2's linear branch carry the attention tail?  A CPU fit per head.

branch_errors.py shows that on the trained original the linear branch with phi = softmax over the head dim
is barely better than the plain mean of the unselected values, while the exact tail softmax would cut the
attention error about 5x.  This script asks whether a learnable phi closes part of that gap *and
generalises*: per (layer, head) it fits phi_W(x) = softmax(x W) (W in R^{d x d}, identity-initialised, so
W = I is today's SLA2) with alpha fitted in closed form, by Adam on one held-out video, and reports the
relative L2 of the attention output on a DIFFERENT video (and noise level) with

* ``SLA2 (W = I)``  today's feature map;
* ``learned W``     the fitted feature map (``--diagonal``: W a per-channel scale, d numbers per head);
* ``exact tail``    the dense softmax over the unselected blocks (the bound for any linear branch).

The linear branch is computed as SLA2's kernels do: per key block states phi(K_j)^T V_j, "all minus
selected" per query block (O(N d^2), no N x N map).  CPU, ~5 min:

    python benchmarks/quality/learned_feature_map.py --out /tmp/learned_phi
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import attention_mass  # noqa: E402
import branch_errors as be  # noqa: E402
import metrics  # noqa: E402
import qcommon as common  # noqa: E402

try:
    from kernels import reference  # noqa: E402
except ImportError:  # pragma: no cover - installed layout
    from slaconv.kernels import reference  # noqa: E402


def head_parts(q, k, v, block_q: int, block_k: int, n_select: int) -> dict:
    """Dense output, renormalised sparse output and exact tail output of one head (N, D), heuristic blocks."""
    keep_blocks, keep = be.heuristic_blocks(q, k, block_q, block_k, n_select)
    br = be.branch_outputs(q, k, v, keep)
    return {"q": q, "k": k, "v": v, "keep_blocks": keep_blocks, "o": br["o"], "o_s": br["o_s"], "o_t": br["o_t"]}


def linear_branch_blocked(q, k, v, keep_blocks, w, block_q: int, block_k: int) -> torch.Tensor:
    """phi_W-linear attention over each query block's unselected key blocks, by block states (differentiable)."""
    n, d = q.shape
    fq, fk = torch.softmax(q @ w, dim=-1), torch.softmax(k @ w, dim=-1)
    nk = n // block_k
    states = torch.einsum("jtd,jte->jde", fk.view(nk, block_k, d), v.view(nk, block_k, d))  # (nk, d, d)
    sums = fk.view(nk, block_k, d).sum(dim=1)  # (nk, d)
    rest = (~keep_blocks).to(q.dtype)  # (nq, nk)
    h_rest = torch.einsum("ij,jde->ide", rest, states)  # (nq, d, d)
    z_rest = rest @ sums  # (nq, d)
    fqb = fq.view(-1, block_q, d)
    num = torch.einsum("itd,ide->ite", fqb, h_rest)
    den = torch.einsum("itd,id->it", fqb, z_rest).unsqueeze(-1) + 1e-6
    return (num / den).reshape(n, d)


def mixed_error(parts: dict, o_l: torch.Tensor) -> torch.Tensor:
    """Relative L2 of alpha o_s + (1 - alpha) o_l against the dense output, alpha fitted in closed form."""
    return be.mixed_error(parts["o"], parts["o_s"], o_l)


def fit_w(parts: dict, block_q: int, block_k: int, steps: int, lr: float, diagonal: bool = False) -> torch.Tensor:
    """W fitted by Adam from the identity; ``diagonal``: only a per-channel scale (d parameters per head)."""
    d = parts["q"].shape[1]
    p = torch.ones(d) if diagonal else torch.eye(d)
    p.requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        w = torch.diag(p) if diagonal else p
        o_l = linear_branch_blocked(parts["q"], parts["k"], parts["v"], parts["keep_blocks"], w, block_q, block_k)
        mixed_error(parts, o_l).backward()
        opt.step()
    return torch.diag(p.detach()) if diagonal else p.detach()


@torch.no_grad()
def capture(model, spec, n_tokens: int, index: int, sigma: float):
    """Per layer (q, k, v) of held-out video ``index`` at noise level ``sigma``."""
    hs = metrics.heldout_set(spec, index + 1, seed=common.HELDOUT_SEED, sigmas=(sigma,))
    one = {key: val[index : index + 1] for key, val in hs.items()}  # every entry is batched
    return attention_mass.capture_qk(model, one, n_tokens, values=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "checkpoint" / "model")
    ap.add_argument("--out", type=Path, default=Path("/tmp/learned_phi"))
    ap.add_argument("--topk", type=float, default=0.03)
    ap.add_argument("--fit", default="0:0.5", help="video index:sigma of the fit")
    ap.add_argument("--test", nargs="+", default=["1:0.5", "1:0.2", "1:0.8"], help="video index:sigma pairs to test on")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--diagonal", action="store_true", help="fit only a per-channel scale (W diagonal)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timer = common.Timer()
    bq, bk = 128, 64
    spec, _ = common.trained_spec(args.model)
    model = common.load_model(args.model, "cpu")
    n = spec.tokens(tuple(model.config.patch_size))
    n_sel = reference.topk_count(args.topk, n // bk)
    parse = lambda s: (int(s.split(":")[0]), float(s.split(":")[1]))  # noqa: E731
    fit_calls = capture(model, spec, n, *parse(args.fit))
    tests = {t: capture(model, spec, n, *parse(t)) for t in args.test}
    records = []
    for layer, (q, k, v) in enumerate(fit_calls):
        for h in range(q.shape[1]):
            w = fit_w(head_parts(q[0, h], k[0, h], v[0, h], bq, bk, n_sel), bq, bk, args.steps, args.lr, args.diagonal)
            for t, calls in tests.items():
                tq, tk, tv = (x[0, h] for x in calls[layer])
                parts = head_parts(tq, tk, tv, bq, bk, n_sel)
                with torch.no_grad():
                    rec = {"layer": layer, "head": h, "test": t}
                    for name, ww in (("SLA2 (W = I)", torch.eye(q.shape[-1])), ("learned W", w)):
                        o_l = linear_branch_blocked(tq, tk, tv, parts["keep_blocks"], ww, bq, bk)
                        rec[name] = float(mixed_error(parts, o_l))
                    rec["exact tail"] = float(mixed_error(parts, parts["o_t"]))
                    rec["sparse only"] = float((parts["o_s"] - parts["o"]).norm() / parts["o"].norm())
                records.append(rec)
        print(f"layer {layer} fitted [{timer():.0f} s]", flush=True)
    cols = ["sparse only", "SLA2 (W = I)", "learned W", "exact tail"]
    lines = ["| layer | test (video:sigma) | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for layer in sorted({r["layer"] for r in records}) + ["all"]:
        for t in args.test:
            rs = [r for r in records if (layer == "all" or r["layer"] == layer) and r["test"] == t]
            lines.append(f"| {layer} | {t} | " + " | ".join(f"{sum(r[c] for r in rs) / len(rs):.3f}" for c in cols) + " |")
    md = (f"# A learned feature map for the linear branch ({args.model})\n\n"
          f"top-k {args.topk} ({n_sel} of {n // bk} key blocks, heuristic router), blocks {bq} x {bk}; "
          f"{'diagonal ' if args.diagonal else ''}W fitted per "
          f"head on held-out video:sigma {args.fit} ({args.steps} Adam steps, lr {args.lr}), tested on other videos / "
          f"noise levels. Relative L2 of the attention output against dense, alpha fitted per head; mean over heads.\n\n"
          + "\n".join(lines) + f"\n\nRuntime {timer():.0f} s on {args.threads} CPU threads.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md)
    common.write_json(args.out / "results.json", {"settings": {k: str(v) for k, v in vars(args).items()},
                                                   "records": records})
    print(md)


if __name__ == "__main__":
    main()
