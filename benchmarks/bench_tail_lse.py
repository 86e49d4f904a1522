"""Launch settings of the tail log-sum-exp pass (``mixing="query"``) at the Wan2.1-1.3B shape.

    python benchmarks/bench_tail_lse.py [--topk 0.03] [--rep 100] [--out DIR]

``tail_lse_kernel`` gives every query row the log-sum-exp of its pooled logits over the key blocks its query
block did not select: a (BLOCK_M x D) x (D x CHUNK) MMA per step over all key-block means, 1/64 of a dense
Q K^T.  At (1, 12, 32760, 128) that is 51.5 GFLOP and 201 M exponentials per call, so at the sparse loop's
~300 TFLOP/s it should take ~0.2 ms.  Each row here times the whole host call (``sla2_triton_linear.tail_lse``:
selection table, centred block means, the launch) for one (tile rows, CHUNK, warps, stages) setting on the same
bf16 inputs and LUT, and checks its output against the PyTorch reference (``reference.pooled_tail_lse``, fp32)
on 8 query blocks (the first and the ragged last included; max abs difference in log2 units).  Writes
bench_tail_lse.json and .md to --out (default $OUT or ./bench_out).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton

from slaconv.kernels import reference
from slaconv.kernels import sla2_triton as S
from slaconv.kernels import sla2_triton_linear as linear

SHAPE = (1, 12, 32760, 128)
DEVICE = "cuda"
BLOCK_Q, BLOCK_K = 128, 64
FORWARD = dict(tile_m=128, chunk=linear.TAIL_CHUNK, num_warps=linear.TAIL_WARPS, num_stages=linear.TAIL_STAGES)
SETTINGS = [FORWARD] + [s for s in (dict(tile_m=m, chunk=c, num_warps=w, num_stages=st)
                                    for m, c, w, st in itertools.product((128, 64), (64, 128), (8, 4), (2, 3)))
                        if s != FORWARD]
"""(tile rows, key blocks per MMA, warps, stages) of each row; the first is the launch the forward uses."""


def make_inputs(topk: float, seed: int = 0):
    """bf16 Q and K in (B, N, H, D) (keys off centre, as real ones are), K's block means and token sums in the
    launch's (B*H, ...) layout, and a random LUT of ``topk`` of the key blocks per query block."""
    b, h, n, d = SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(b, n, h, d, generator=g, device=DEVICE, dtype=torch.bfloat16) + 0.5
    k_bhnd = k.transpose(1, 2)
    k_mean = reference.block_mean(k_bhnd, BLOCK_K).reshape(b * h, -1, d)
    k_sum = k_bhnd.float().sum(2).reshape(b * h, d)
    nq, nk = reference.block_count(n, BLOCK_Q), k_mean.shape[1]
    n_sel = max(1, round(topk * nk))
    lut = torch.rand(b, h, nq, nk, generator=g, device=DEVICE).topk(n_sel, dim=-1).indices.int()
    return q, k, k_mean, k_sum, lut


def expected(q, k, lut, q_blocks):
    """LSE_tail (log2 units) of the rows of ``q_blocks`` from the PyTorch reference, fp32: (B*H, rows)."""
    b, h, n, d = SHAPE
    rows = torch.cat([torch.arange(i * BLOCK_Q, min(n, (i + 1) * BLOCK_Q), device=DEVICE) for i in q_blocks])
    selected = reference.lut_to_mask(lut, reference.block_count(n, BLOCK_K))[:, :, rows // BLOCK_Q]
    lse = reference.pooled_tail_lse(q.transpose(1, 2)[:, :, rows], k.transpose(1, 2), selected, BLOCK_K)
    return (lse[..., 0] * reference.LOG2E).reshape(b * h, -1), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topk", type=float, default=0.03)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    b, h, n, d = SHAPE
    q, k, k_mean, k_sum, lut = make_inputs(args.topk)
    _, q_strides = S._dims(q, "bnhd")
    qk_scale = reference.LOG2E / math.sqrt(d)
    nq = reference.block_count(n, BLOCK_Q)
    want, rows = expected(q, k, lut, [0, 1, 37, 100, 128, 200, nq - 2, nq - 1])
    results = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), shape=SHAPE, topk=args.topk, rows=[])
    flops = 2 * b * h * n * k_mean.shape[1] * d
    for setting in SETTINGS:
        opts = dict(num_warps=setting["num_warps"], num_stages=setting["num_stages"])

        def call(setting=setting, opts=opts):
            return linear.tail_lse(q, q_strides, k_mean, k_sum, lut, n, h, BLOCK_Q, BLOCK_K, qk_scale,
                                   setting["tile_m"], shifted=False, launch_options=opts, chunk=setting["chunk"])

        row = dict(setting)
        try:
            got = call()[:, rows]
            row["max_abs_err_log2"] = (got - want).abs().max().item()
            row["ms"] = triton.testing.do_bench(call, warmup=25, rep=args.rep, return_mode="median")
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as exc:  # a setting that does not compile or run is a failed row; the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_tail_lse.json").write_text(json.dumps(results, indent=1))
    lines = [f"{results['date']} {results['card']} torch {results['torch']} triton {results['triton']}",
             f"command: {results['command']}", "",
             "| tile rows | chunk | warps | stages | ms | TFLOP/s | max abs err (log2) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['tile_m']} | {r['chunk']} | {r['num_warps']} | {r['num_stages']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['tile_m']} | {r['chunk']} | {r['num_warps']} | {r['num_stages']} | {r['ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['max_abs_err_log2']:.1e} |")
    (out / "bench_tail_lse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
