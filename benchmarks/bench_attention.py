"""SLA2 Triton attention vs torch SDPA (cuDNN and FlashAttention backends), same run, same card.

    python benchmarks/bench_attention.py [--quick] [--out DIR] [--config JSON] [--linear-keys all|unselected]
                                         [--auto | --sweep | --profile]

Prints one table (ms = triton.testing.do_bench median; speed-up vs each SDPA backend; dense-equivalent
TFLOPS = 4*B*H*N^2*D / t, x2.5 for the backward; peak memory above the inputs) and writes JSON +
markdown to --out (default $OUT or ./bench_out).  The whole SLA2 op is timed: router, LUT, quantisation
pre-passes, kernels and mix; each forward is also replayed from a CUDA graph ("graph ms": the kernels
alone, without the Python launch work that bounds the eager call at 97%).  ``--linear-keys`` picks the linear
branch's keys (default ``all``, the shipped recipes' form; ``unselected`` is the paper's). Before timing it checks
the kernel against the reference on a subset of query blocks at the realistic size. ``--config`` overrides fields
of the kernels' launch settings (``slaconv.kernels.launch.LaunchConfig``), e.g. ``'{"lin_stages": 4}'``; ``--auto``
sweeps a few launch variants first and builds the table with the fastest. Needs the package installed (``pip
install -e .``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from slaconv.kernels import reference, sla2_triton_backward, sla2_triton_forward
from slaconv.kernels import sla2_triton as S
from slaconv.kernels.launch import DEFAULT_LAUNCH, LaunchConfig
from slaconv.kernels.spec import AttentionSpec


def launch_config(overrides_json: str) -> LaunchConfig:
    """The default launch settings with the fields a JSON object names replaced ('' = the defaults)."""
    overrides = json.loads(overrides_json) if overrides_json else {}
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"unknown launch setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return dataclasses.replace(DEFAULT_LAUNCH, **overrides)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


LINEAR_KEYS = "all"  # the linear branch's keys in every row: main() sets it from --linear-keys


def sla2(q, k, v, rq, rk, al, topk, quant="none", layout="bnhd", launch=None):
    """The SLA2 op as the benchmark times it (128-query / 64-key blocks)."""
    return S.sla2_attention_triton(q, k, v, rq, rk, al, AttentionSpec(topk, quant=quant), layout=layout, launch=launch,
                                   linear_keys=LINEAR_KEYS)


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(b, h, n, d, seed=0, layout="bnhd"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (b, n, h, d) if layout == "bnhd" else (b, h, n, d)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    eye = torch.eye(d, device="cuda").repeat(h, 1, 1)
    al = torch.randn(h, generator=g, device="cuda")
    return q, k, v, eye.clone(), eye.clone(), al


def bench(fn, rep_ms):
    return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def graph_time(fn, rep_ms):
    """ms per call of ``fn`` replayed from a CUDA graph (no host work per call: the kernels' time back to back),
    or the capture's error as a string: an op that cannot be captured is a finding, not a crash."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: compiles, allocator pools
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay, rep_ms)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def peak_mem(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def check_correctness(results, launch, n=32760, h=12, d=128):
    """Kernel vs reference at the realistic size on a subset of query blocks, every precision, both layouts."""
    for layout in ("bnhd", "bhnd"):
        q, k, v, rq, rk, al = make_inputs(1, h, n, d, seed=1, layout=layout)
        qb = torch.tensor([0, 37, 128, reference.block_count(n, 128) - 1], device="cuda")
        for quant in ("none", "int8", "int8-fp8"):
            for topk in (0.03, 0.1):
                out = sla2(q, k, v, rq, rk, al, topk, quant, layout, launch)
                qh, kh, vh = ((t.transpose(1, 2) if layout == "bnhd" else t) for t in (q, k, v))
                oh = out.transpose(1, 2) if layout == "bnhd" else out
                rows = (qb.view(-1, 1) * 128 + torch.arange(128, device="cuda")).view(-1)
                rows = rows[rows < n]
                ref = reference.sla2_attention_reference(
                    qh, kh, vh, rq, rk, al, topk=topk, quant=quant, q_blocks=qb, chunk_q_blocks=2,
                    linear_keys=LINEAR_KEYS,
                )
                r = rel_l2(oh[:, :, rows], ref)
                cos = torch.nn.functional.cosine_similarity(
                    oh[:, :, rows].double().flatten(), ref.double().flatten(), dim=0
                ).item()
                tol = 1e-2 if quant == "none" else 5e-2
                ok = r <= tol and (quant == "none" or cos >= 0.999)
                results["correctness"].append(
                    dict(layout=layout, quant=quant, topk=topk, rel_l2=r, cos=cos, ok=bool(ok))
                )
                print(f"check {layout} {quant:9s} topk={topk}: rel_l2={r:.2e} cos={cos:.6f} {'OK' if ok else 'FAIL'}")
        del q, k, v
        torch.cuda.empty_cache()


def run_shape(results, b, h, n, d, topks, rep_small, launch):
    flops_fwd = 4.0 * b * h * n * n * d
    rep = rep_small if n < 50000 else max(rep_small, 400)
    q, k, v, rq, rk, al = make_inputs(b, h, n, d, seed=2, layout="bnhd")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, N, D): a view, as diffusers does
    go = torch.randn_like(q)
    rows = []

    def row(name, ms, flops, mem, base=None):
        rows.append(dict(shape=f"({b},{h},{n},{d})", name=name, ms=ms, tflops=flops / ms / 1e9, mem_gib=mem, **(base or {})))

    # baselines
    base = {}
    for bname, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
                ms = bench(f, rep)
                mem = peak_mem(f)
                qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (qt, kt, vt))

                def fb():
                    o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                    o.backward(go.transpose(1, 2))

                ms_fb = triton.testing.do_bench(fb, warmup=max(10, rep // 4), rep=rep * 2, grad_to_none=[qg, kg, vg], return_mode="median")
                mem_fb = peak_mem(fb)
                del qg, kg, vg
        except Exception as e:  # noqa: BLE001
            print(f"SDPA {bname} failed: {e}")
            continue
        base[bname] = dict(fwd=ms, fb=ms_fb, bwd=ms_fb - ms)
        row(f"sdpa-{bname} fwd", ms, flops_fwd, mem)
        row(f"sdpa-{bname} bwd", ms_fb - ms, 2.5 * flops_fwd, mem_fb)
        torch.cuda.empty_cache()

    def speedups(ms, kind):
        return {f"x_{bn}": base[bn][kind] / ms for bn in base}

    for topk in topks:
        for quant in ("none", "int8", "int8-fp8"):
            f = lambda: sla2(q, k, v, rq, rk, al, topk, quant, launch=launch)  # noqa: E731
            ms = bench(f, rep)
            graph = graph_time(f, rep)
            extra = speedups(ms, "fwd")
            if isinstance(graph, float):
                extra.update(graph_ms=graph, **{f"graph_x_{bn}": base[bn]["fwd"] / graph for bn in base})
            else:
                extra.update(graph_error=graph)
            row(f"sla2 {quant} fwd top{topk}", ms, flops_fwd, peak_mem(f), extra)
        qg, kg, vg, ag = (t.detach().clone().requires_grad_(True) for t in (q, k, v, al))

        def fb():
            o = sla2(qg, kg, vg, rq, rk, ag, topk, launch=launch)
            o.backward(go)

        f_ms = [r for r in rows if r["name"] == f"sla2 none fwd top{topk}"][-1]["ms"]
        ms_fb = triton.testing.do_bench(fb, warmup=max(10, rep // 4), rep=rep * 2, grad_to_none=[qg, kg, vg, ag], return_mode="median")
        row(f"sla2 bwd top{topk}", ms_fb - f_ms, 2.5 * flops_fwd, peak_mem(fb), speedups(ms_fb - f_ms, "bwd"))
        row(f"sla2 fwd+bwd top{topk}", ms_fb, 3.5 * flops_fwd, float("nan"), speedups(ms_fb, "fb"))
        del qg, kg, vg, ag
        torch.cuda.empty_cache()
    results["rows"].extend(rows)
    del q, k, v, qt, kt, vt, go
    torch.cuda.empty_cache()


def kernel_resources():
    """Registers / spills of every compiled SLA2 kernel variant (Triton 3.6 device_caches layout)."""
    out = {}
    jit_functions = {name: fn for module in (sla2_triton_forward, sla2_triton_backward)
                     for name, fn in vars(module).items()
                     if isinstance(fn, triton.runtime.jit.JITFunction) and not name.startswith("_")}
    for name, fn in jit_functions.items():
        try:
            for cache in fn.device_caches.values():
                for key, ck in cache[0].items():
                    ck._init_handles()
                    ptx = ck.asm.get("ptx", "")
                    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]+", ptx)))
                    out.setdefault(name, []).append(
                        dict(warps=ck.metadata.num_warps, stages=ck.metadata.num_stages, regs=ck.n_regs,
                             spills=ck.n_spills, smem=ck.metadata.shared, mma=mma,
                             scalar_b16_loads=ptx.count("ld.global.b16"))
                    )
        except Exception as e:  # noqa: BLE001
            out[name] = f"unavailable: {e}"
    return out


def sweep(results, base, n=32760, h=12, d=128, topk=0.03, variants_on=True):
    """Per-kernel GPU time breakdown (torch.profiler) and a sweep of launch variants of ``base`` at one size;
    records the fastest combination as ``results["best_config"]``."""
    q, k, v, rq, rk, al = make_inputs(1, h, n, d, seed=3)
    go = torch.randn_like(q)
    qg, kg, vg, ag = (t.detach().clone().requires_grad_(True) for t in (q, k, v, al))

    def fb(launch=base):
        o = sla2(qg, kg, vg, rq, rk, ag, topk, launch=launch)
        o.backward(go)

    from torch.profiler import ProfilerActivity, profile

    def prof_table(label, fn):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22)
        print(f"--- profile {label} x3, topk={topk}")
        print(tab)
        results.setdefault("profile", {})[label] = tab

    for quant in ("none", "int8-fp8"):
        prof_table(f"fwd-inference-{quant}", lambda: sla2(q, k, v, rq, rk, al, topk, quant, launch=base))
    prof_table("fwd+bwd-none", fb)
    if not variants_on:
        res = kernel_resources()
        print("resources", json.dumps(res))
        results["resources"] = res
        return
    # Screened offline first (benchmarks/kernel_report.py: registers, spills, programs per SM).  The
    # variants measured and dropped are listed in slaconv/kernels/README.md.
    variants = [
        {},
        {"lin_stages": 4},  # linear loops: 2 tile buffers, smaller shared-memory footprint
        {"num_stages": 4},  # sparse loop: 4 K/V buffers (164 KB shared memory offline)
        {"key_pass": 1},  # k_feats + kv_outer as one launch (linear branch over every key block only)
        {"dkdv_gluon": 1, "dq_gluon": 1},  # the sparse backward's Gluon launches (Hopper)
    ]
    for changes in variants:
        launch = dataclasses.replace(base, **changes)
        rec = dict(changes)
        for quant in ("none", "int8-fp8"):
            try:
                f = lambda: sla2(q, k, v, rq, rk, al, topk, quant, launch=launch)  # noqa: E731
                rec[f"fwd_{quant}"] = bench(f, 100)
            except Exception as e:  # noqa: BLE001
                rec[f"fwd_{quant}"] = f"ERR {type(e).__name__}: {str(e)[:80]}"
        try:
            rec["fwd+bwd"] = triton.testing.do_bench(lambda: fb(launch), warmup=25, rep=200,  # noqa: B023
                                                     grad_to_none=[qg, kg, vg, ag], return_mode="median")
        except Exception as e:  # noqa: BLE001
            rec["fwd+bwd"] = f"ERR {type(e).__name__}: {str(e)[:80]}"
        print("sweep", json.dumps(rec))
        results.setdefault("sweep", []).append(rec)

    # best forward and best backward settings, combined
    def num(x):
        return x if isinstance(x, float) else float("inf")

    sw = results["sweep"]
    best_fwd = min(sw, key=lambda r: num(r["fwd_none"]) + num(r["fwd_int8-fp8"]))
    best_fb = min(sw, key=lambda r: num(r["fwd+bwd"]))
    fwd_keys = ("tile_m_fwd", "num_warps", "num_stages", "lin_warps", "lin_stages", "key_pass")
    bwd_keys = ("tile_m_bwd", "num_warps_bwd", "num_stages_bwd", "dkdv_gluon", "dq_gluon")
    best = {k: best_fwd.get(k, getattr(base, k)) for k in fwd_keys}
    best.update({k: best_fb.get(k, getattr(base, k)) for k in bwd_keys})
    results["best_config"] = best
    print("best", json.dumps(best))
    res = kernel_resources()
    print("resources", json.dumps(res))
    results["resources"] = res


def fmt_table(rows, card):
    lines = [
        f"card: {card}",
        "| shape | op | ms | x cuDNN | x Flash | graph ms | graph x cuDNN | graph x Flash | dense-eq TFLOPS | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else ""

    for r in rows:
        mem = "" if r["mem_gib"] != r["mem_gib"] else f"{r['mem_gib']:.2f}"
        graph = cell(r, "graph_ms", ".3f") or r.get("graph_error", "")
        lines.append(f"| {r['shape']} | {r['name']} | {r['ms']:.3f} | {cell(r, 'x_cudnn', '.1f')} | "
                     f"{cell(r, 'x_flash', '.1f')} | {graph} | {cell(r, 'graph_x_cudnn', '.1f')} | "
                     f"{cell(r, 'graph_x_flash', '.1f')} | {r['tflops']:.0f} | {mem} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--topk", type=float, nargs="+", default=[0.10, 0.05, 0.03], help="top-k fractions (default 90/95/97%%)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--config", default="", help="JSON overrides of the launch settings (slaconv.kernels.launch.LaunchConfig)")
    ap.add_argument("--sweep", action="store_true", help="profile + launch-config sweep at (1,12,32760,128), no table")
    ap.add_argument("--auto", action="store_true", help="sweep first, then the table with the best launch config")
    ap.add_argument("--profile", action="store_true", help="kernel-by-kernel profile + resources first, then the table")
    ap.add_argument("--linear-keys", choices=("all", "unselected"), default="all",
                    help="the linear branch's keys: every key block (the shipped recipes) or the unselected ones")
    args = ap.parse_args()
    global LINEAR_KEYS
    LINEAR_KEYS = args.linear_keys
    launch = launch_config(args.config)
    card = torch.cuda.get_device_name()
    results = dict(
        card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv), linear_keys=LINEAR_KEYS,
        config=dataclasses.asdict(launch), correctness=[], rows=[],
    )
    if args.auto:
        sweep(results, launch)
        launch = dataclasses.replace(launch, **results["best_config"])
        results["config"] = dataclasses.asdict(launch)
    elif args.profile:
        sweep(results, launch, variants_on=False)
    elif args.sweep:
        sweep(results, launch)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(results, indent=1))
        return
    if not args.no_check:
        check_correctness(results, launch)
    shapes = [(1, 12, 32760, 128)] + ([] if args.quick else [(1, 40, 75600, 128)])
    for shp in shapes:
        run_shape(results, *shp, topks=tuple(args.topk), rep_small=args.rep, launch=launch)
        print(fmt_table([r for r in results["rows"] if r["shape"] == f"({shp[0]},{shp[1]},{shp[2]},{shp[3]})"], card))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(results, indent=1))
    table = fmt_table(results["rows"], card)
    (out / "bench_attention.md").write_text(
        f"{results['date']} {card} torch {results['torch']} triton {results['triton']}\n"
        f"command: {results['command']}\nlinear keys: {LINEAR_KEYS}\nconfig: {results['config']}\n\n{table}\n"
    )
    print()
    print(table)


if __name__ == "__main__":
    main()
