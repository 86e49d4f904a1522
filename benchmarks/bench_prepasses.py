"""The forward's key passes under their launch settings, beside a copy of K (the memory-bandwidth floor).

    python benchmarks/bench_prepasses.py [--out DIR]

At (1, 12, 32760, 128) bf16, (B, N, H, D) layout, 64-key blocks: ``k_feats`` (block means and sums of K, -phi(K)
with softmax features, the column sums z; with ``vabs=1`` also max|V| per block, as ``int8-fp8`` runs it) at 2
and 4 warps, and ``kv_outer`` (the split-K H_all = sum phi(K)^T V) at 22 and 44 splits per head, 8 warps, 2 or 3
stages (the settings an earlier, wider sweep found best); ``key_pass`` (both in one launch, phi(K) never written:
what the linear branch over every key block needs) at 11 and 22 splits per head, 8 or 16 warps, 2 or 3 stages, with and
without max|V| and with Hedgehog features; beside ``K.clone()`` (reads and writes K once), ``torch.add(K, V,
out=...)`` (reads both, writes one) and a torch softmax of K.
ms = ``triton.testing.do_bench`` median.  Writes bench_prepasses.json to --out (default $OUT or ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

from slaconv.kernels import sla2_triton_forward as forward_kernels

B, N, H, D, BLOCK_K = 1, 32760, 12, 128, 64


def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    bh, nk = B * H, -(-N // BLOCK_K)
    k = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    strides = (k.stride(0), k.stride(2), k.stride(1))
    k_mean = torch.empty(bh, nk, D, device="cuda")
    sums = torch.empty(2, bh, nk, D, device="cuda")
    v_absmax = torch.empty(bh, nk, D, device="cuda")
    neg_phi_k = torch.empty(bh, N, D, device="cuda", dtype=k.dtype)
    kv_sum = torch.empty_like(k)
    res = {"card": torch.cuda.get_device_name(), "torch_copy_K_ms": bench(lambda: k.clone()),
           "torch_add_K_V_ms": bench(lambda: torch.add(k, v, out=kv_sum)),
           "torch_softmax_K_ms": bench(lambda: torch.softmax(k, dim=-1))}
    for need_v in (False, True):
        for warps in (2, 4):
            for stages in (1,):
                res[f"k_feats vabs={int(need_v)} warps={warps} stages={stages}"] = bench(
                    lambda: forward_kernels.k_feats[(nk, bh)](  # noqa: B023
                        k, v, k_mean, sums[0], sums[1], v_absmax if need_v else sums[1], neg_phi_k, k_mean,  # noqa: B023
                        *strides, *strides, N, H, nk, D=D, BLOCK_N=BLOCK_K, NEED_V_ABSMAX=need_v,  # noqa: B023
                        NEGATE_PHI=True, HEDGEHOG=False, num_warps=warps, num_stages=stages))  # noqa: B023
    for splits in (22, 44):
        partial = torch.empty(bh, splits, D, D, device="cuda")
        for warps in (8,):
            for stages in (2, 3):
                res[f"kv_outer splits={splits} warps={warps} stages={stages}"] = bench(
                    lambda: forward_kernels.kv_outer[(splits, bh)](  # noqa: B023
                        neg_phi_k, v, partial, *strides, N, H, nk, splits, D=D, BLOCK_N=BLOCK_K,  # noqa: B023
                        num_warps=warps, num_stages=stages))  # noqa: B023
    w_signed = (0.3 * torch.randn(H, D, D, device="cuda")).to(k.dtype)
    for splits in (11, 22):
        partial = torch.empty(bh, splits, D, D, device="cuda")
        sums = torch.empty(3, bh, splits, D, device="cuda")
        for hedgehog, need_v in ((False, False), (False, True), (True, False)):
            for warps in (8, 16):
                for stages in (2, 3):
                    name = f"key_pass splits={splits} hedgehog={int(hedgehog)} vabs={int(need_v)} warps={warps} " \
                           f"stages={stages}"
                    res[name] = bench(
                        lambda: forward_kernels.key_pass[(splits, bh)](  # noqa: B023
                            k, v, k_mean, partial, sums[0], sums[1], sums[2], w_signed, *strides, *strides,  # noqa: B023
                            N, H, nk, splits, D=D, BLOCK_N=BLOCK_K, NEED_V_ABSMAX=need_v,  # noqa: B023
                            HEDGEHOG=hedgehog, num_warps=warps, num_stages=stages))  # noqa: B023
    for name, ms in res.items():
        print(name, ms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prepasses.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
