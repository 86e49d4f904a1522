"""One transformer forward (and one training step) of the real Wan2.1 architectures, dense vs SLA2.

Random bf16 weights (speed does not depend on their values); dense attention is torch SDPA with
the cuDNN backend, measured in the same run on the same card.  Prints one table; writes JSON and
markdown to --out.

    python benchmarks/bench_model.py --model 1.3b --out OUT        # 480p, 32,760 tokens, 30 layers
    python benchmarks/bench_model.py --model 14b --layers 4 --out OUT   # 720p, 75,600 tokens, 4 of 40 layers
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

CONFIGS = {
    # diffusers' Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer configs
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENTS = {"1.3b": (1, 16, 21, 60, 104), "14b": (1, 16, 21, 90, 160)}


def build(model: str, layers: int | None):
    from diffusers import WanTransformer3DModel

    cfg = {**COMMON, **CONFIGS[model]}
    if layers:
        cfg["num_layers"] = layers
    with torch.device("cuda"):
        net = WanTransformer3DModel(**cfg)
    return net.to(torch.bfloat16).eval(), cfg


def set_attention(net, mode: str, topk: float = 0.05, quant: str = "none", launch=None):
    import slaconv
    from slaconv.families import get_family
    from slaconv.install import sla2_processors

    if mode == "dense":
        fam = get_family("wan")
        for name, module in net.named_modules():
            if name.endswith("attn1"):
                module.set_processor(fam.stock_processor())
        return
    processors = sla2_processors(net) or slaconv.sla2_(net, slaconv.SLA2Config(block_q=128, block_k=64))
    for proc in processors.values():
        proc.config = proc.config.replace(topk=topk, quant=quant)
        if launch is not None:  # the kernels' launch settings, passed on every call of this processor
            proc.sparse_attention = functools.partial(type(proc).sparse_attention, proc, launch=launch)


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(CONFIGS), default="1.3b")
    ap.add_argument("--layers", type=int, help="build only this many layers (times are scaled to the full depth)")
    ap.add_argument("--train", action="store_true", help="also time one forward+backward training step")
    ap.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.03])
    ap.add_argument("--quant", nargs="+", default=["none", "int8-fp8"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the repeated blocks (dense and SLA2 alike) to fuse the non-attention ops")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--kernel-config", default="",
                    help="JSON overrides of the SLA2 kernels' launch settings (slaconv.kernels.launch.LaunchConfig)")
    args = ap.parse_args()

    from bench_attention import launch_config

    launch = launch_config(args.kernel_config) if args.kernel_config else None
    net, cfg = build(args.model, args.layers)
    if args.compile:
        net.compile_repeated_blocks(fullgraph=True)
    full_layers = CONFIGS[args.model]["num_layers"]
    scale = full_layers / cfg["num_layers"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*LATENTS[args.model], device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500.0], device="cuda")
    tokens = LATENTS[args.model][2] * LATENTS[args.model][3] * LATENTS[args.model][4] // 4
    rows = []

    def forward():
        with torch.no_grad():
            net(x, t, text, return_dict=False)

    def record(name, ms, mem):
        rows.append({"config": name, "ms": ms * scale, "peak_gb": mem})
        print(f"{name:<34} {ms * scale:10.1f} ms   peak {mem:6.1f} GB", flush=True)

    def measure(name, fn, reps=args.reps):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            ms = timed(fn, reps)
        except Exception as exc:  # e.g. a graph break under --compile: report it, keep measuring the rest
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            rows.append({"config": name, "ms": float("nan"), "peak_gb": float("nan"), "error": str(exc)[:500]})
            return
        record(name, ms, torch.cuda.max_memory_allocated() / 2**30)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        set_attention(net, "dense")
        measure("forward dense (cuDNN SDPA)", forward)
    for topk in args.topk:
        for quant in args.quant:
            set_attention(net, "sla2", topk, quant, launch)
            measure(f"forward SLA2 {1 - topk:.0%} {quant}", forward)

    if args.train:
        net.enable_gradient_checkpointing()
        net.train()
        net.requires_grad_(True)

        def step():
            out = net(x, t, text, return_dict=False)[0]
            out.float().square().mean().backward()
            net.zero_grad(set_to_none=True)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            set_attention(net, "dense")
            measure("train step dense (cuDNN SDPA)", step, reps=2)
        set_attention(net, "sla2", args.topk[-1], args.quant[-1], launch)
        measure(f"train step SLA2 {1 - args.topk[-1]:.0%} {args.quant[-1]}", step, reps=2)

    base = rows[0]["ms"]
    for r in rows:
        ref = base if r["config"].startswith("forward") else next(x["ms"] for x in rows if x["config"].startswith("train step dense"))
        r["speedup"] = ref / r["ms"]
    meta = {"model": args.model, "tokens": tokens, "layers_built": cfg["num_layers"], "layers_full": full_layers,
            "card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    meta["compiled"] = args.compile
    meta["kernel_config"] = args.kernel_config or "defaults"
    tag = f"{args.model}{'_compiled' if args.compile else ''}"
    (args.out / f"bench_model_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Wan2.1-{args.model} forward, {tokens} tokens, {meta['card']}" + (", torch.compile'd blocks" if args.compile else "")
             + (f" ({cfg['num_layers']} of {full_layers} layers built, times scaled x{scale:g})" if scale != 1 else ""),
             "", "| config | ms | speed-up | peak GB |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['peak_gb']:.1f} |" for r in rows]
    table = "\n".join(lines)
    (args.out / f"bench_model_{tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
