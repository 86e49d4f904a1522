"""What the linear branch's options cost in the Triton kernels: Hedgehog features, alpha per query, all keys.

    python benchmarks/bench_linear_options.py [--topk 0.03 0.05] [--rep 100] [--out DIR] [--no-check] [--config JSON]

At (1, 12, 32760, 128) bf16 (Wan2.1-1.3B), for each top-k: the whole SLA2 op with softmax or Hedgehog
features, alpha per head or per query, and the linear branch over the unselected or all key blocks
(:data:`OPTIONS`), in 16 bits (``none``) and ``int8-fp8``, forward and forward + backward, beside cuDNN SDPA
timed in the same run; also the CPU time of issuing one forward ("host": where it exceeds the kernels' time, the
forward is bound by the Python launches, not the GPU) and the forward replayed from a CUDA graph ("graph": the
kernels alone, as ``torch.compile(mode="reduce-overhead")`` would run them).  Each row's overhead is against
softmax / per head in the same mode.  Then a per-kernel profile (torch.profiler) at the first top-k: the forward
of every row, and forward + backward of Hedgehog / per query, which show the pre-passes, the tail log-sum-exp
launch and the feature-gradient GEMMs on their own (GPU ms per call of each kernel).
Before timing, Hedgehog / per head is checked against the PyTorch reference on a subset of query blocks.
``--config`` overrides fields of the launch settings (``'{"sparse_gluon": 0}'``: every row on the plain sparse
loop; the default takes the Gluon loop for every option on a Hopper GPU).
Writes bench_linear_options.json and .md to --out (default $OUT or ./bench_out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
from bench_attention import graph_time, launch_config
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel

from slaconv.kernels import reference
from slaconv.kernels import sla2_triton as S
from slaconv.kernels.spec import AttentionSpec

SHAPE = (1, 12, 32760, 128)
OPTIONS = [("softmax", "head", "unselected"), ("hedgehog", "head", "unselected"), ("softmax", "query", "unselected"),
           ("hedgehog", "query", "unselected"), ("softmax", "head", "all"), ("hedgehog", "head", "all"),
           ("hedgehog", "query", "all"),
           ("hedgehog", "query-linear", "all"), ("hedgehog", "query-block", "all")]
"""(features, alpha, linear keys) of each row; the first is the paper's form, every row's baseline."""
QUANTS = ("none", "int8-fp8")


def make_inputs(b, h, n, d, seed=0):
    """bf16 Q, K, V in (B, N, H, D), identity routers, alpha logits, Hedgehog weights (H, D, D/2) and the query
    weights of alpha per query from the query (H, D)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    eye = torch.eye(d, device="cuda").repeat(h, 1, 1)
    al = torch.randn(h, generator=g, device="cuda")
    wq, wk = (torch.randn(h, d, d // 2, generator=g, device="cuda") / math.sqrt(d) for _ in range(2))
    aw = torch.randn(h, d, generator=g, device="cuda") / math.sqrt(d)
    return q, k, v, eye, eye.clone(), al, wq, wk, aw


LAUNCH = None  # the launch settings of every row: main() sets them from --config


def run(tensors, topk, quant, feature, mixing, linear_keys="unselected"):
    q, k, v, rq, rk, al, wq, wk, aw = tensors
    weights = (wq, wk) if feature == "hedgehog" else (None, None)
    return S.sla2_attention_triton(q, k, v, rq, rk, al, AttentionSpec(topk, quant=quant), layout="bnhd",
                                   feature_q=weights[0], feature_k=weights[1], mixing=mixing, launch=LAUNCH,
                                   linear_keys=linear_keys,
                                   alpha_weight=aw if mixing in ("query-linear", "query-block") else None)


def bench_forward(fn, rep):
    return triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median")


def host_time(fn, calls=20, repeats=5):
    """CPU ms per call of issuing ``fn``'s work (median of ``repeats`` runs of ``calls`` back-to-back calls, the
    GPU idle at the start of each): the forward's wall time cannot fall below it, whatever the kernels take."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def bench_forward_backward(tensors, topk, quant, feature, mixing, linear_keys, go, rep):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    leaves[3], leaves[4] = tensors[3], tensors[4]  # the router gets no gradient

    def step():
        run(leaves, topk, quant, feature, mixing, linear_keys).backward(go)

    grads = [t for i, t in enumerate(leaves) if i not in (3, 4)]
    return triton.testing.do_bench(step, warmup=max(10, rep // 4), rep=2 * rep, grad_to_none=grads,
                                   return_mode="median")


def check_hedgehog(tensors, results):
    """Hedgehog / per head against the reference on four query blocks, 16 bits and int8-fp8, at 97%."""
    q, k, v, rq, rk, al, wq, wk, _ = tensors
    n = q.shape[1]
    blocks = torch.tensor([0, 37, 128, reference.block_count(n, 128) - 1], device="cuda")
    rows = (blocks.view(-1, 1) * 128 + torch.arange(128, device="cuda")).view(-1)
    rows = rows[rows < n]
    for quant in QUANTS:
        out = run(tensors, 0.03, quant, "hedgehog", "head").transpose(1, 2)[:, :, rows]
        ref = reference.sla2_attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), rq, rk, al, topk=0.03,
                                                 quant=quant, q_blocks=blocks, chunk_q_blocks=2, feature_q=wq,
                                                 feature_k=wk)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        ok = err <= (1e-2 if quant == "none" else 5e-2)
        results["check"].append(dict(quant=quant, rel_l2=err, ok=ok))
        print(f"check hedgehog/head {quant}: rel_l2 {err:.2e} {'OK' if ok else 'FAIL'}")


def sdpa_rows(tensors, go, rep):
    q, k, v = (t.transpose(1, 2) for t in tensors[:3])
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        fwd = bench_forward(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), rep)
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

        def step():
            torch.nn.functional.scaled_dot_product_attention(*leaves).backward(go.transpose(1, 2))

        fb = triton.testing.do_bench(step, warmup=max(10, rep // 4), rep=2 * rep, grad_to_none=leaves,
                                     return_mode="median")
    return fwd, fb


def kernel_times(label, fn, calls=3):
    """GPU time per call of each kernel ``fn`` launches (torch.profiler), in ms, longest first; printed."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    # kernel events only: an operator's row would count its kernels a second time
    times = {e.key: e.self_device_time_total / 1e3 / calls for e in prof.key_averages()
             if e.device_type == DeviceType.CUDA}
    times = dict(sorted(times.items(), key=lambda kv: -kv[1]))
    print(f"--- GPU ms per call, {label}: total {sum(times.values()):.3f}")
    for name, ms in times.items():
        print(f"{ms:8.3f}  {name[:100]}")
    return times


def _ms(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return value if value == "not run" else f"failed ({value})"


def markdown(results):
    lines = [f"{results['date']} {results['card']} torch {results['torch']} triton {results['triton']}",
             f"command: {results['command']}", f"launch: {results['launch']}", "",
             f"cuDNN SDPA: forward {results['cudnn']['fwd']:.3f} ms, forward+backward {results['cudnn']['fb']:.3f} ms",
             "", "| top-k | quant | features | alpha | linear keys | fwd ms | fwd host ms | fwd graph ms | vs softmax/head "
             "| x cuDNN | fwd+bwd ms | vs softmax/head | x cuDNN |",
             "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['topk']} | {r['quant']} | {r['feature']} | {r['mixing']} | {r['linear_keys']} | "
                     f"{r['fwd']:.3f} | {r['fwd_host']:.3f} | {_ms(r['fwd_graph'])} | "
                     f"{100 * r['fwd_overhead']:+.1f}% | {r['x_cudnn_fwd']:.1f} | {r['fb']:.3f} | "
                     f"{100 * r['fb_overhead']:+.1f}% | {r['x_cudnn_fb']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topk", type=float, nargs="+", default=[0.03, 0.05], help="top-k fractions (97%%, 95%%)")
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--config", default="", help="JSON overrides of the launch settings (LaunchConfig)")
    args = ap.parse_args()
    global LAUNCH
    LAUNCH = launch_config(args.config)
    card = torch.cuda.get_device_name()
    results = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv), shape=SHAPE,
                   launch=str(LAUNCH), check=[], rows=[], profile={})
    tensors = make_inputs(*SHAPE, seed=2)
    go = torch.randn_like(tensors[0])
    if not args.no_check:
        check_hedgehog(tensors, results)
    cudnn_fwd, cudnn_fb = sdpa_rows(tensors, go, args.rep)
    results["cudnn"] = dict(fwd=cudnn_fwd, fb=cudnn_fb)
    print(f"cuDNN SDPA: fwd {cudnn_fwd:.3f} ms, fwd+bwd {cudnn_fb:.3f} ms")
    for topk in args.topk:
        for quant in QUANTS:
            base = None
            for feature, mixing, linear_keys in OPTIONS:
                fwd = bench_forward(lambda: run(tensors, topk, quant, feature, mixing, linear_keys),  # noqa: B023
                                    args.rep)
                host = host_time(lambda: run(tensors, topk, quant, feature, mixing, linear_keys))  # noqa: B023
                fb = bench_forward_backward(tensors, topk, quant, feature, mixing, linear_keys, go, args.rep)
                base = base or (fwd, fb)
                row = dict(topk=topk, quant=quant, feature=feature, mixing=mixing, linear_keys=linear_keys, fwd=fwd, fb=fb,
                           fwd_host=host, fwd_graph="not run",
                           fwd_overhead=fwd / base[0] - 1, fb_overhead=fb / base[1] - 1,
                           x_cudnn_fwd=cudnn_fwd / fwd, x_cudnn_fb=cudnn_fb / fb)
                results["rows"].append(row)
                print(json.dumps(row))
                torch.cuda.empty_cache()
    topk = args.topk[0]
    for quant in QUANTS:
        for feature, mixing, linear_keys in OPTIONS:
            label = f"forward, {quant}, {feature} / {mixing} / {linear_keys}"
            results["profile"][label] = kernel_times(
                label, lambda: run(tensors, topk, quant, feature, mixing, linear_keys))  # noqa: B023
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    results["profile"]["fwd+bwd hedgehog/query"] = kernel_times(
        "forward + backward, hedgehog / query",
        lambda: run(leaves, topk, "none", "hedgehog", "query").backward(go))
    # last: a capture that fails can leave the CUDA context unusable, and nothing else is left to measure then
    for row in results["rows"]:
        row["fwd_graph"] = graph_time(
            lambda r=row: run(tensors, r["topk"], r["quant"], r["feature"], r["mixing"], r["linear_keys"]), args.rep)
        print(f"graph {row['topk']} {row['quant']} {row['feature']}/{row['mixing']}/{row['linear_keys']}: "
              f"{row['fwd_graph']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_linear_options.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "bench_linear_options.md").write_text(table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
