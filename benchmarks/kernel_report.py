"""Compile every SLA2 kernel for Hopper offline (no GPU needed) and report what the hardware will run.

    python benchmarks/kernel_report.py [--shape B,H,N,D] [--topk 0.03] [--quant none] [--arch 90]
                                       [--backward] [--hedgehog] [--mixing head|query|query-linear|query-block]
                                       [--linear-keys unselected|all] [--json FILE]

The SLA2 forward (and optionally backward) is driven exactly as in production, but every Triton launch is
intercepted: the arguments are recorded and each kernel is compiled for ``sm_<arch>`` with the
specialisation Triton itself would pick for them (pointer alignment 16, integers divisible by 16 unless
listed in ``do_not_specialize``, integers equal to 1 as constants).  For each launch it prints registers,
local-memory spill instructions in the SASS, the global-load instructions by width (``ld.global.b16`` in
a tile loop means 2-byte scalar loads: an alignment the compiler could not prove) and the MMA
instructions.  Triton ships ptxas and cuobjdump, so this runs on a CPU-only machine: it is how kernel
changes are checked before spending GPU time.  The numbers match a compile on the card only for the same
Triton version: run it with the Triton the GPU machines use (``make test TRITON36=1`` builds a Triton 3.6
environment, ``.venv-triton36``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

# Compiling for the GPU needs the kernels in compiled mode, which triton.jit fixes when a module is
# imported; the launch settings the driver picks also depend on it.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from bench_attention import launch_config  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction  # noqa: E402

from slaconv.kernels import (  # noqa: E402
    sla2_gluon,
    sla2_gluon_backward,
    sla2_triton,  # noqa: E402
    sla2_triton_backward,
    sla2_triton_forward,
    sla2_triton_ws,
)
from slaconv.kernels.launch import DEFAULT_LAUNCH  # noqa: E402
from slaconv.kernels.spec import AttentionSpec  # noqa: E402

KERNEL_MODULES = (sla2_triton_forward, sla2_triton_backward, sla2_triton_ws, sla2_gluon, sla2_gluon_backward)
_TORCH_TO_TRITON = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
    torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv",
}
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch instead of running it."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs))
            if self.fn.__name__ == "router_topk":  # later host code (the inverted index) reads the LUT
                lut, _, nk, n_sel = args[4:8]
                lut.copy_(torch.rand(lut.numel() // n_sel, nk).topk(n_sel, dim=-1).indices.sort(dim=-1).values
                          .view_as(lut))

        return launch


def record_launches(shape, topk, quant, backward, layout="bnhd", launch=DEFAULT_LAUNCH, dtype=torch.bfloat16,
                    hedgehog=False, mixing="head", linear_keys="unselected"):
    """Run the production driver on CPU tensors with every kernel replaced by a recorder; ``hedgehog`` and
    ``mixing`` pick the linear branch's feature map and alpha, ``linear_keys`` its keys
    (:func:`sla2_triton.sla2_attention_triton`)."""
    B, H, N, D = shape
    launches = []
    saved = [(module, name, obj) for module in KERNEL_MODULES for name, obj in vars(module).items()
             if isinstance(obj, triton.runtime.jit.JITFunction) and not name.startswith("_")]
    try:
        for module, name, fn in saved:
            setattr(module, name, _Recorder(fn, launches))
        # the tensors are on the CPU: the Gluon launch's device check would refuse before recording
        sla2_gluon.check_device = _no_device_check
        g = torch.Generator().manual_seed(0)
        dims = (B, N, H, D) if layout == "bnhd" else (B, H, N, D)
        q, k, v = (torch.randn(dims, generator=g).to(dtype) for _ in range(3))
        eye = torch.eye(D).expand(H, D, D).contiguous()
        alpha = torch.zeros(H)
        spec = AttentionSpec(topk, 128, 64, quant)
        features = [torch.randn(H, D, D, generator=g).to(dtype) for _ in range(2)] if hedgehog else [None, None]
        alpha_weight = torch.randn(H, D, generator=g) if mixing in ("query-linear", "query-block") else None
        out = sla2_triton.forward(q, k, v, eye, eye, alpha, spec, layout, backward, launch, *features, mixing,
                                  linear_keys, alpha_weight)
        if backward:
            o, lut, lse, inv_den, h_all, z_all, alpha_rows = out
            sla2_triton.backward(torch.randn_like(q), q, k, v, alpha, lut, o, lse, inv_den, h_all, z_all, 128, 64,
                                 layout, launch, *features, alpha_rows, linear_keys, alpha_weight is not None)
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
        sla2_gluon.check_device = _check_device
    return launches


_check_device = sla2_gluon.check_device


def _no_device_check(device) -> None:
    return None


def _signature(fn, args, kwargs):
    signature = inspect.signature(fn.fn)
    params = list(signature.parameters)
    no_spec = set(fn.do_not_specialize) | {params[i] for i in fn.do_not_specialize if isinstance(i, int)}
    sig, constexprs, attrs = {}, {}, {}
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    values = defaults | dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    for i, name in enumerate(params):
        val = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[(i,)] = val
        elif isinstance(val, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(val).__name__ == "TensorDescriptor":
            from triton.runtime.jit import mangle_type

            sig[name] = mangle_type(val)
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            sig[name] = "i64" if abs(val) >= 2**31 else "i32"
            if name not in no_spec:
                if val == 1:
                    sig[name] = "constexpr"
                    constexprs[(i,)] = 1
                elif val % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot map argument {name}={val!r}")
    return sig, constexprs, attrs


def compile_launch(fn, args, kwargs, arch=90):
    sig, constexprs, attrs = _signature(fn, args, kwargs)
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    return triton.compile(source(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=opts)


def analyse(compiled) -> dict:
    """Registers, spill instructions, global-load kinds and MMA kinds of a compiled kernel."""
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([_TOOLS / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_TOOLS / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    loads, mmas = {}, {}
    for m in re.finditer(r"\b(ld\.global[\w.]*|cp\.async\.(?:ca|cg)[\w.]*|cp\.async\.bulk\.tensor[\w.]*)", ptx):
        loads[m.group(1)] = loads.get(m.group(1), 0) + 1
    for m in re.finditer(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx):
        mmas[m.group(1)] = mmas.get(m.group(1), 0) + 1
    return {
        # warp specialization: the partitions Triton split the program into, the warps of all of them, the
        # register budgets (setmaxnreg) it gives them and the TMA loads
        "warp_specialize": compiled.asm["ttgir"].count("ttg.warp_specialize"),
        "total_warps": compiled.metadata.num_warps,
        "setmaxnreg": sorted({int(m) for m in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        # wgmma.wait_group N sites by N (N = 1: an MMA group stays in flight past the wait) and whether the
        # program reads the grid size (a persistent loop striding over work items)
        "wgmma_waits": dict(Counter(int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
        "reads_grid_size": bool(re.search(r"%nctaid\.x", ptx)),
        "registers": int(regs.group(1)) if regs else None,
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
        "shared_bytes": compiled.metadata.shared,
        "loads": loads,
        "mma": mmas,
        "scalar_16bit_loads": loads.get("ld.global.b16", 0),
        "ctas_per_sm": _occupancy(int(regs.group(1)) if regs else 255, compiled.metadata.num_warps, compiled.metadata.shared),
    }


def _occupancy(regs: int, warps: int, smem: int, sm_regs: int = 65536, sm_smem: int = 232448) -> int:
    """Resident programs per Hopper SM allowed by registers and shared memory (at most 32 warps' worth)."""
    by_regs = sm_regs // (((regs + 7) // 8 * 8) * 32 * warps)
    by_smem = sm_smem // max(smem + 1024, 1)
    return max(0, min(by_regs, by_smem, 64 // warps))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,12,32760,128", help="B,H,N,D (default: Wan2.1-1.3B at 480p)")
    ap.add_argument("--topk", type=float, default=0.03)
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int8-fp8"])
    ap.add_argument("--layout", default="bnhd", choices=["bnhd", "bhnd"])
    ap.add_argument("--backward", action="store_true", help="also the backward kernels")
    ap.add_argument("--hedgehog", action="store_true", help="Hedgehog features instead of softmax")
    ap.add_argument("--mixing", default="head", choices=["head", "query", "query-linear", "query-block"],
                    help="alpha per head, per query from the tail mass, or per query from the query")
    ap.add_argument("--linear-keys", default="unselected", choices=["unselected", "all"],
                    help="the linear branch over the unselected key blocks or all")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--config", default="",
                    help="JSON overrides of the launch settings (slaconv.kernels.launch.LaunchConfig)")
    a = ap.parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    launch = launch_config(a.config)
    rows = []
    print(f"triton {triton.__version__}, sm_{a.arch}, shape {shape}, topk {a.topk}, quant {a.quant}, {a.layout}")
    for fn, grid, args, kwargs in record_launches(shape, a.topk, a.quant, a.backward, a.layout, launch,
                                                  hedgehog=a.hedgehog, mixing=a.mixing,
                                                  linear_keys=a.linear_keys):
        const = {k: v for k, v in kwargs.items() if k.isupper()}
        info = analyse(compile_launch(fn, args, kwargs, a.arch))
        info |= {"kernel": fn.__name__, "grid": list(grid), "constexprs": const,
                 "num_warps": kwargs.get("num_warps"), "num_stages": kwargs.get("num_stages")}
        rows.append(info)
        print(f"{fn.__name__:22s} grid={tuple(grid)} warps={info['num_warps']} stages={info['num_stages']} "
              f"{const} regs={info['registers']} spills={info['spill_instructions']} smem={info['shared_bytes']} "
              f"ctas/SM={info['ctas_per_sm']}")
        print(f"{'':22s} loads {info['loads']}")
        print(f"{'':22s} mma   {info['mma']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
