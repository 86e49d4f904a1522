"""One transformer forward (and one training step) of real DiT architectures, dense vs SLA2.

Random bf16 weights (speed does not depend on their values); dense attention is torch SDPA with the cuDNN
backend, measured in the same run on the same card.  The inputs are built by the model family's own
``make_inputs``, as calibration builds them.  Prints one table; writes JSON and markdown to --out.

    python benchmarks/bench_model.py --model 1.3b --out OUT           # Wan2.1-1.3B 480p, 32,760 tokens, 30 layers
    python benchmarks/bench_model.py --model 14b --layers 4 --out OUT  # Wan2.1-14B 720p, 75,600 tokens, 4 of 40 layers
    python benchmarks/bench_model.py --model flux-dev --out OUT        # FLUX.1-dev 1024 x 1024, 4,096 + 512 tokens
    python benchmarks/bench_model.py --model hunyuanvideo --layers 2 --out OUT  # 720p x 129 frames, 118,800 + 256

``--layers N`` builds N blocks of each kind (double- and single-stream for Flux and HunyuanVideo) and scales
the times to the full depth by the count of attention layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Architecture:
    """A published transformer configuration and the latents it runs on."""

    title: str
    family: str
    config: dict
    """Constructor arguments of the family's diffusers class (the published checkpoint's config.json)."""
    depth: tuple[str, ...]
    """The config keys that count blocks."""
    latents: tuple[int, int, int, int]
    """(C, F, H, W) of the latents at the benchmark resolution."""
    text_len: int


_WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
MODELS = {
    # diffusers' Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer configs
    "1.3b": Architecture("Wan2.1-1.3B 480p", "wan", dict(_WAN, num_attention_heads=12, attention_head_dim=128,
                                                         ffn_dim=8960, num_layers=30),
                         ("num_layers",), (16, 21, 60, 104), 512),
    "14b": Architecture("Wan2.1-14B 720p", "wan", dict(_WAN, num_attention_heads=40, attention_head_dim=128,
                                                       ffn_dim=13824, num_layers=40),
                        ("num_layers",), (16, 21, 90, 160), 512),
    # black-forest-labs/FLUX.1-dev transformer config; 1024 x 1024 -> 16 x 128 x 128 latents, 64 x 64 tokens
    "flux-dev": Architecture("FLUX.1-dev 1024x1024", "flux",
                             dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                             ("num_layers", "num_single_layers"), (16, 1, 128, 128), 512),
    # hunyuanvideo-community/HunyuanVideo transformer config; 1280 x 720 x 129 frames -> 16 x 33 x 90 x 160
    "hunyuanvideo": Architecture("HunyuanVideo 720p 129 frames", "hunyuan_video",
                                 dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                      num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                      patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                      text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                      rope_axes_dim=(16, 56, 56)),
                                 ("num_layers", "num_single_layers"), (16, 33, 90, 160), 256),
}


def build(arch: Architecture, layers: int | None, device: str):
    """The architecture with random bf16 weights (``layers`` blocks of each kind if given), and its config."""
    from slaconv.families import get_family

    cfg = dict(arch.config)
    if layers:
        cfg.update({key: layers for key in arch.depth})
    with torch.device(device):
        net = get_family(arch.family).load_class()(**cfg)
    return net.to(torch.bfloat16).eval(), cfg


def model_inputs(net, arch: Architecture, latents_shape, device: str) -> dict:
    """Forward kwargs from the family's make_inputs: random latents and text (all real tokens), noise level 0.5."""
    from slaconv.families import get_family

    family = get_family(arch.family)
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    conditioning = {}
    pooled = family.pooled_dim(net.config)
    if pooled:
        conditioning["pooled_embeds"] = randn(1, pooled)
    if family.text_mask:
        conditioning["prompt_mask"] = torch.ones(1, arch.text_len, device=device, dtype=dtype)
    return family.make_inputs(net, randn(1, *latents_shape), torch.tensor([500.0], device=device),
                              randn(1, arch.text_len, family.text_dim(net.config)), **conditioning)


def set_attention(net, family, mode: str, topk: float = 0.05, quant: str = "none", launch=None,
                  linear_keys: str = "all"):
    """Stock processors on every SLA2 layer (``dense``), or SLA2 with ``topk``, ``quant`` and ``linear_keys``
    (installed with an identity router on the family's default layers the first time)."""
    import slaconv
    from slaconv.install import sla2_processors

    if mode == "dense":
        modules = dict(net.named_modules())
        for name in sla2_processors(net):
            modules[name].set_processor(family.stock_processor())
        return
    processors = sla2_processors(net) or slaconv.sla2_(net, slaconv.SLA2Config(block_q=128, block_k=64), family=family)
    for proc in processors.values():
        proc.config = proc.config.replace(topk=topk, quant=quant, linear_keys=linear_keys)
        if launch is not None:  # the kernels' launch settings, passed on every call of this processor
            proc.sparse_attention = functools.partial(type(proc).sparse_attention, proc, launch=launch)


def timed(fn, reps: int = 3) -> float:
    """Median milliseconds of ``reps`` calls after a warm-up (CUDA events on a GPU, the wall clock elsewhere)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slaconv.families import get_family

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, help="build only this many blocks of each kind (times are scaled to the "
                                               "full depth)")
    ap.add_argument("--train", action="store_true", help="also time one forward+backward training step")
    ap.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.03])
    ap.add_argument("--quant", nargs="+", default=["none", "int8-fp8"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--linear-keys", choices=("all", "unselected"), default="all",
                    help="the linear branch over every key block (the shipped recipes) or the unselected ones (the "
                         "paper's form)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the repeated blocks (dense and SLA2 alike) to fuse the non-attention ops")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--kernel-config", default="",
                    help="JSON overrides of the SLA2 kernels' launch settings (slaconv.kernels.launch.LaunchConfig)")
    ap.add_argument("--device", default="cuda", help="cpu only checks that the script runs (use a small --latents)")
    ap.add_argument("--latents", type=int, nargs=3, metavar=("F", "H", "W"),
                    help="another latent frames x height x width than the architecture's usual resolution")
    args = ap.parse_args()

    from bench_attention import launch_config

    arch = MODELS[args.model]
    family = get_family(arch.family)
    launch = launch_config(args.kernel_config) if args.kernel_config else None
    net, cfg = build(arch, args.layers, args.device)
    if args.compile:
        net.compile_repeated_blocks(fullgraph=True)
    full_layers = sum(arch.config[key] for key in arch.depth)
    built_layers = sum(cfg[key] for key in arch.depth)
    scale = full_layers / built_layers
    latents = (arch.latents[0], *args.latents) if args.latents else arch.latents
    kwargs = model_inputs(net, arch, latents, args.device)
    pt, ph, pw = family.patch_size(net.config)
    tokens = latents[1] // pt * (latents[2] // ph) * (latents[3] // pw)
    rows = []

    def forward():
        with torch.no_grad():
            net(**kwargs)

    def record(name, ms, mem):
        rows.append({"config": name, "ms": ms * scale, "peak_gb": mem})
        print(f"{name:<34} {ms * scale:10.1f} ms   peak {mem:6.1f} GB", flush=True)

    def measure(name, fn, reps=args.reps, keep_going=True):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            ms = timed(fn, reps)
        except Exception as exc:  # e.g. a graph break under --compile: report it, keep measuring the rest
            if not keep_going:
                raise
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            rows.append({"config": name, "ms": float("nan"), "peak_gb": float("nan"), "error": str(exc)[:500]})
            return
        record(name, ms, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))

    def measure_dense(kind, fn, reps=args.reps):
        """cuDNN SDPA; where it refuses the call (HunyuanVideo's stock processor always passes its text mask),
        the memory-efficient backend, and the row says so."""
        set_attention(net, family, "dense")
        if not args.device.startswith("cuda"):
            return measure(f"{kind} dense (SDPA)", fn, reps)
        for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cuDNN"), (SDPBackend.EFFICIENT_ATTENTION, "mem-efficient")):
            try:
                with sdpa_kernel(backend):
                    return measure(f"{kind} dense ({label} SDPA)", fn, reps, keep_going=backend != SDPBackend.CUDNN_ATTENTION)
            except RuntimeError as exc:
                print(f"{kind} dense: {label} SDPA refused: {str(exc).splitlines()[0][:200]}", flush=True)

    measure_dense("forward", forward)
    for topk in args.topk:
        for quant in args.quant:
            set_attention(net, family, "sla2", topk, quant, launch, args.linear_keys)
            measure(f"forward SLA2 {1 - topk:.0%} {quant}", forward)

    if args.train:
        net.enable_gradient_checkpointing()
        net.train()
        net.requires_grad_(True)

        def step():
            out = net(**kwargs)[0]
            out.float().square().mean().backward()
            net.zero_grad(set_to_none=True)

        measure_dense("train step", step, reps=2)
        set_attention(net, family, "sla2", args.topk[-1], args.quant[-1], launch, args.linear_keys)
        measure(f"train step SLA2 {1 - args.topk[-1]:.0%} {args.quant[-1]}", step, reps=2)

    base = rows[0]["ms"]
    for r in rows:
        ref = base if r["config"].startswith("forward") else next(x["ms"] for x in rows if x["config"].startswith("train step dense"))
        r["speedup"] = ref / r["ms"]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else args.device
    meta = {"model": args.model, "title": arch.title, "tokens": tokens, "text_tokens": arch.text_len,
            "latents": list(latents), "layers_built": built_layers, "layers_full": full_layers, "card": card,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "compiled": args.compile,
            "kernel_config": args.kernel_config or "defaults"}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}{'_compiled' if args.compile else ''}"
    (args.out / f"bench_model_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = f" + {arch.text_len} text" if family.forward_context is not None else ""
    lines = [f"{arch.title} forward, {tokens} tokens{text}, {card}" + (", torch.compile'd blocks" if args.compile else "")
             + (f" ({built_layers} of {full_layers} attention layers built, times scaled x{scale:g})" if scale != 1 else ""),
             "", "| config | ms | speed-up | peak GB |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['peak_gb']:.1f} |" for r in rows]
    table = "\n".join(lines)
    (args.out / f"bench_model_{tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
