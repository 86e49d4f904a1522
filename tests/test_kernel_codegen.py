"""Code generation of the SLA2 kernels for Hopper, checked on a machine without a GPU.

Triton ships ptxas and cuobjdump, so each launch of the production driver can be compiled for sm_90
here (benchmarks/kernel_report.py).  This guards the property whose loss made every kernel 2-3x slower
without failing any numerical test: user-tensor tiles are loaded with 16-byte vector / cp.async
instructions, never 2-byte scalar loads (that happens when Triton cannot prove row alignment, e.g. if
strides are excluded from specialisation).  The report runs in a subprocess: the Triton interpreter used
by the other kernel tests patches triton.language process-wide.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Located, not imported: importing triton here, before tests/test_kernels.py sets TRITON_INTERPRET=1,
# would leave the interpreter half-configured for that file.
_spec = importlib.util.find_spec("triton")
if _spec is None or not (Path(_spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
    pytest.skip("no Triton build with the NVIDIA tools", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "kernel_report.py"

# The Triton of this environment, and Triton 3.6 (the GPU machines' version) where `make test TRITON36=1`
# (what CI runs) built it a small environment: the kernels must compile with both.
TRITON36 = os.environ.get("SLACONV_TRITON36_PYTHON")
PYTHONS = [pytest.param(sys.executable, id="this-triton"),
           pytest.param(TRITON36, id="triton-3.6",
                        marks=pytest.mark.skipif(not TRITON36, reason="no Triton 3.6 environment (make test TRITON36=1)"))]


def _report(tmp_path, python, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    # the Triton 3.6 environment holds torch and triton only: it imports slaconv from this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = tmp_path / "report.json"
    cmd = [python, str(REPORT), "--shape", "1,2,1000,128", "--topk", "0.1", "--json", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_triton36_environment_is_triton_3_6():
    if not TRITON36:
        pytest.skip("no Triton 3.6 environment (make test TRITON36=1)")
    res = subprocess.run([TRITON36, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    assert res.stdout.strip().startswith("3.6"), (res.stdout, res.stderr[-500:])


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("quant,layout", [("none", "bnhd"), ("int8-fp8", "bhnd")])
def test_every_launch_loads_tiles_vectorised_on_sm90(tmp_path, python, quant, layout):
    # the plain Triton sparse loop (other GPUs, and "int8"): on sm_90 the default runs the Gluon one instead,
    # checked on its own below
    rows = _report(tmp_path, python, "--quant", quant, "--layout", layout, *(["--backward"] if quant == "none" else []),
                   "--config", json.dumps({"sparse_gluon": 0}))
    names = {r["kernel"] for r in rows}
    assert {"fwd_sparse_kernel", "fwd_lin_kernel", "k_feats", "kv_outer", "router_key_proj", "router_topk"} <= names
    if quant == "none":
        assert {"bwd_dq_kernel", "bwd_dkdv_kernel", "bwd_dkdv_lin_kernel", "bwd_dq_lin_kernel"} <= names
    else:
        assert {"kv_quant", "q_prepass"} <= names
    for r in rows:
        assert r["scalar_16bit_loads"] == 0, (r["kernel"], r["loads"])
        assert r["registers"] is not None and r["registers"] <= 255, r
        if r["kernel"] in ("fwd_sparse_kernel", "fwd_lin_kernel", "bwd_dq_kernel"):
            assert r["mma"], (r["kernel"], "no tensor-core instructions")


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("quant,extra", [("none", ["--backward"]), ("int8-fp8", [])])
def test_hedgehog_and_query_mixing_launches_compile_on_sm90(tmp_path, python, quant, extra):
    """Hedgehog features and alpha per query: every launch (forward; backward in 16 bits) compiles for Hopper
    with vectorised tile loads and no spills, the feature passes and the tail launch on the tensor cores.  The
    plain Triton sparse loop (other GPUs); on sm_90 the default takes the Gluon one, checked below."""
    rows = _report(tmp_path, python, "--quant", quant, "--hedgehog", "--mixing", "query", *extra,
                   "--config", json.dumps({"sparse_gluon": 0}))
    by_name = {r["kernel"]: r for r in rows}
    assert {"tail_lse_kernel", "k_feats", "q_prepass", "fwd_sparse_kernel"} <= set(by_name), set(by_name)
    for name in ("tail_lse_kernel", "k_feats", "q_prepass") + (("phi_rows",) if extra else ()):
        assert by_name[name]["mma"], (name, "no tensor-core instructions")
    for r in rows:
        assert r["spill_instructions"] == 0 and r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
def test_sweep_variants_compile_on_sm90(tmp_path, python):
    """Every launch variant the GPU sweep tries (bench_attention.py --auto) compiles for Hopper without
    spills, so no GPU time is spent finding a compile error; with the defaults the linear launch fits
    2 programs per SM."""
    for cfg in ({"num_stages": 4, "sparse_gluon": 0}, {"lin_stages": 4}):
        for quant in ("none", "int8-fp8"):
            rows = _report(tmp_path, python, "--quant", quant, "--config", json.dumps(cfg))
            for r in rows:
                assert r["registers"] is not None and r["spill_instructions"] == 0, (cfg, r)
    rows = _report(tmp_path, python, "--quant", "none")
    lin = next(r for r in rows if r["kernel"] == "fwd_lin_kernel")
    assert lin["ctas_per_sm"] >= 2, lin


@pytest.mark.parametrize("python", PYTHONS)
def test_warp_specialized_sparse_launch_is_split_on_sm90(tmp_path, python):
    """LaunchConfig.sparse_ws: Triton splits the sparse loop into a producer warp group and two consumer
    warp groups (12 warps; setmaxnreg lowers the producer's registers and raises the consumers'), its tiles
    come by TMA, its MMAs are wgmma, and nothing spills.  A kernel change that loses the split still
    computes the right numbers, so only this check notices."""
    rows = _report(tmp_path, python, "--config", json.dumps({"sparse_ws": 1}))
    names = {r["kernel"] for r in rows}
    assert {"psi_rows", "fwd_sparse_ws_kernel"} <= names and "fwd_sparse_kernel" not in names, names
    ws = next(r for r in rows if r["kernel"] == "fwd_sparse_ws_kernel")
    assert ws["warp_specialize"] >= 1 and ws["total_warps"] == 12, ws
    assert min(ws["setmaxnreg"]) <= 64 and max(ws["setmaxnreg"]) >= 200, ws["setmaxnreg"]
    assert ws["tma_loads"] > 0 and any(m.startswith("wgmma") for m in ws["mma"]), ws
    for r in rows:
        assert r["spill_instructions"] == 0 and r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("shape,layout,quant", [("1,2,1000,128", "bnhd", "none"), ("2,2,777,64", "bhnd", "none"),
                                                ("1,2,1000,128", "bhnd", "int8-fp8")])
def test_gluon_sparse_launch_compiles_for_sm90(tmp_path, python, shape, layout, quant):
    """LaunchConfig.sparse_gluon: the Gluon kernel compiles for sm_90a with this Triton and Triton 3.6 into
    a producer and two consumer warpgroups (12 warps; setmaxnreg gives the producer few registers and the
    consumers many, within the SM's 64K at one program per SM), TMA loads and stores through 4-d (batch,
    head, token, dim) descriptors, wgmma for QK^T (m64 x 64 keys) and for PV and the mix (m64 x D), no
    spills (with and without the LSE a backward needs), and shared memory within an H100's.  int8-fp8 reads
    its INT8 / FP8 copies through 3-d descriptors and runs QK^T as INT8 and PV as FP8 wgmma (the mix stays
    16-bit).  The schedule is the one the source states: a persistent loop (the program reads the grid size
    to stride over work items) and, per consumer, one wait that leaves an MMA group in flight (QK^T(j+1)
    done while PV(j) runs on) beside the four full waits (first QK^T, PV in the loop, last PV, mix)."""
    d = int(shape.split(",")[-1])
    extra = ["--backward"] if shape.endswith("128") else []  # a forward that saves the LSE
    rows = _report(tmp_path, python, "--shape", shape, "--layout", layout, "--quant", quant, *extra,
                   "--config", json.dumps({"sparse_gluon": 1}))
    names = {r["kernel"] for r in rows}
    assert "fwd_sparse_gluon_kernel" in names and "fwd_sparse_kernel" not in names, names
    g = next(r for r in rows if r["kernel"] == "fwd_sparse_gluon_kernel")
    assert g["warp_specialize"] >= 1 and g["total_warps"] == 12, g
    producer_regs, consumer_regs = min(g["setmaxnreg"]), 240  # sla2_gluon.CONSUMER_REGS
    assert producer_regs <= 32 and consumer_regs in g["setmaxnreg"], g["setmaxnreg"]
    assert (4 * producer_regs + 8 * consumer_regs) * 32 <= 65536, g["setmaxnreg"]
    assert g["loads"].get("cp.async.bulk.tensor.4d.shared", 0) > 0, g["loads"]  # Q (16-bit) by TMA
    assert g["loads"].get("cp.async.bulk.tensor.2d.shared", 0) > 0, g["loads"]  # H_rest by TMA
    assert g["loads"].get("cp.async.bulk.tensor.4d.global.shared", 0) > 0, g["loads"]  # O by TMA
    assert g["reads_grid_size"], g
    assert g["wgmma_waits"] == {"0": 8, "1": 2}, g["wgmma_waits"]
    mix = f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.bf16.bf16"
    if quant == "none":
        assert {"wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", mix} <= set(g["mma"]), g["mma"]
    else:
        assert g["loads"].get("cp.async.bulk.tensor.3d.shared", 0) > 0, g["loads"]  # INT8 Q, K and FP8 V^T
        assert {"wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8", mix,
                f"wgmma.mma_async.sync.aligned.m64n{d}k32.f32.e4m3.e4m3"} <= set(g["mma"]), g["mma"]
    assert g["spill_instructions"] == 0 and g["scalar_16bit_loads"] == 0, g
    assert g["shared_bytes"] <= 232448 - 1024, g


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("quant", ["none", "int8-fp8"])
def test_gluon_launch_with_linear_options_compiles_for_sm90(tmp_path, python, quant):
    """Hedgehog features and alpha per query in the Gluon epilogue with phi(Q) from the q pre-pass
    (``gluon_query_features=0``; the default computes it in the launch, checked below) in a forward that saves
    the LSE and alpha per row: still a producer and two consumer warpgroups, wgmma for QK^T, PV and the mix,
    no spills, and shared memory within an H100's."""
    rows = _report(tmp_path, python, "--quant", quant, "--hedgehog", "--mixing", "query", "--backward",
                   "--config", json.dumps({"gluon_query_features": 0}))
    names = {r["kernel"] for r in rows}
    assert {"fwd_sparse_gluon_kernel", "tail_lse_kernel", "q_prepass"} <= names and "fwd_sparse_kernel" not in names
    g = next(r for r in rows if r["kernel"] == "fwd_sparse_gluon_kernel")
    assert g["warp_specialize"] >= 1 and g["total_warps"] == 12, g
    assert len([m for m in g["mma"] if m.startswith("wgmma")]) >= 2, g["mma"]
    assert g["spill_instructions"] == 0 and g["scalar_16bit_loads"] == 0, g
    assert g["shared_bytes"] <= 232448 - 1024, g


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("config", [{"sparse_gluon": 0}, {"sparse_gluon": 1}], ids=["plain", "gluon"])
@pytest.mark.parametrize("mixing", ["query-linear", "query-block"])
def test_row_weight_mixings_compile_for_sm90(tmp_path, python, config, mixing):
    """mixing: query-linear (each row's alpha logit formed by the Q pre-pass and read where the tail
    log-sum-exp would be) and query-block (the row's q . w term from the Q pre-pass, the tail's block-pooled
    log-sum-exp from the router's block means, here in its own small launch): no tail launch over
    every row, the Q pre-pass with the row
    term, the sparse launch (plain and Gluon) and the backward's row pass with its per-row gradient compile for
    sm_90 without spills or scalar 16-bit loads, with Hedgehog features and in int8-fp8 (except, as with alpha
    per query from the tail mass, a few loop-invariant wgmma descriptors Triton 3.9 spills in the Gluon
    launch's int8-fp8 form; none with Triton 3.6)."""
    if mixing == "query-block":  # the estimate's own launch (LaunchConfig.block_tail_launch) compiles too
        config = {**config, "block_tail_launch": 1}
    for quant, extra in (("none", ["--backward"]), ("int8-fp8", [])):
        rows = _report(tmp_path, python, "--quant", quant, "--hedgehog", "--mixing", mixing, "--linear-keys",
                       "all", *extra, "--config", json.dumps(config))
        names = {r["kernel"] for r in rows}
        sparse = "fwd_sparse_gluon_kernel" if config["sparse_gluon"] else "fwd_sparse_kernel"
        assert sparse in names and "tail_lse_kernel" not in names, names
        assert ("block_tail_lse_kernel" in names) == (mixing == "query-block"), names
        if extra:
            assert "bwd_rows" in names, names
        for r in rows:
            lowbit_gluon_on_39 = (r["kernel"] == "fwd_sparse_gluon_kernel" and quant == "int8-fp8"
                                  and python != TRITON36)
            assert r["spill_instructions"] <= (96 if lowbit_gluon_on_39 else 0), r
            assert r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("quant,mixing", [("none", "query"), ("int8-fp8", "head"), ("int8-fp8", "query")])
def test_gluon_query_features_in_launch_compile_for_sm90(tmp_path, python, quant, mixing):
    """LaunchConfig.gluon_query_features, the default: the q pre-pass no longer computes Hedgehog features (no MMA left in
    it), the Gluon launch loads the weights by TMA (a second 2-d load beside H_rest's) and runs one more wgmma
    of m64 x D per warpgroup; the consumers keep 232 registers so the producer, which now also places the
    weights, gets 40.  No spills, except loop-invariant wgmma descriptors that Triton 3.9 (not 3.6, the GPU
    machines') spills in int8-fp8 with alpha per query: scalars reloaded beside an MMA, bounded here."""
    rows = _report(tmp_path, python, "--quant", quant, "--hedgehog", "--mixing", mixing, "--backward",
                   "--config", json.dumps({"sparse_gluon": 1, "gluon_query_features": 1}))
    by_name = {r["kernel"]: r for r in rows}
    assert not by_name["q_prepass"]["mma"], by_name["q_prepass"]
    g = by_name["fwd_sparse_gluon_kernel"]
    assert g["loads"].get("cp.async.bulk.tensor.2d.shared", 0) == 2, g["loads"]
    assert sorted(g["setmaxnreg"])[0] == 40 and 232 in g["setmaxnreg"], g["setmaxnreg"]
    mix = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
    baseline = {r["kernel"]: r for r in _report(tmp_path, python, "--quant", quant, "--hedgehog", "--mixing", mixing,
                                                "--backward", "--config",
                                                json.dumps({"sparse_gluon": 1, "gluon_query_features": 0}))}
    assert g["mma"][mix] > baseline["fwd_sparse_gluon_kernel"]["mma"][mix], (g["mma"], baseline)
    is_triton36 = python == TRITON36
    spills_allowed = 96 if (quant, mixing) == ("int8-fp8", "query") and not is_triton36 else 0
    assert g["spill_instructions"] <= spills_allowed, g
    assert g["shared_bytes"] <= 232448 - 1024, g
    for r in rows:
        if r["kernel"] != "fwd_sparse_gluon_kernel":
            assert r["spill_instructions"] == 0 and r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("config", [{"sparse_gluon": 0}, {"sparse_gluon": 1}], ids=["plain", "gluon"])
def test_linear_branch_over_every_key_block_compiles_for_sm90(tmp_path, python, config):
    """sla2.linear_keys: all: no linear launch in the forward, the sparse launch (plain and Gluon) reading one
    state per head, every launch (forward and backward) without spills or scalar 16-bit loads."""
    rows = _report(tmp_path, python, "--linear-keys", "all", "--backward", "--config", json.dumps(config))
    names = {r["kernel"] for r in rows}
    sparse = "fwd_sparse_gluon_kernel" if config["sparse_gluon"] else "fwd_sparse_kernel"
    assert sparse in names and "fwd_lin_kernel" not in names, names
    assert {"bwd_dq_lin_kernel", "bwd_dkdv_lin_kernel"} <= names, names
    for r in rows:
        assert r["spill_instructions"] == 0 and r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("quant,hedgehog", [("none", False), ("int8-fp8", False), ("none", True)])
def test_key_pass_compiles_for_sm90(tmp_path, python, quant, hedgehog):
    """LaunchConfig.key_pass with the linear branch over every key block: one launch replaces k_feats and
    kv_outer, its K and V loads are pipelined (cp.async), phi(K)^T V and the ones-MMA sums run on wgmma, and
    nothing spills."""
    rows = _report(tmp_path, python, "--quant", quant, *(["--hedgehog"] if hedgehog else []), "--linear-keys", "all",
                   "--config", json.dumps({"key_pass": 1}))
    names = {r["kernel"] for r in rows}
    assert "key_pass" in names and not {"k_feats", "kv_outer"} & names, names
    r = next(r for r in rows if r["kernel"] == "key_pass")
    assert r["loads"].get("cp.async.cg.shared.global", 0) > 0, r["loads"]
    assert any(m.startswith("wgmma") for m in r["mma"]), r["mma"]
    assert r["spill_instructions"] == 0 and r["scalar_16bit_loads"] == 0, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("n", [32760, 75600])
def test_router_compiles_without_spills_for_sm90(tmp_path, python, n):
    """The router's two launches at the 1.3B 480p and the 14B 720p sequence (512 and 1182 key blocks; the latter's
    top-k holds its integer keys four rows at a time): 3-pass TF32 MMAs, no spills."""
    rows = _report(tmp_path, python, "--shape", f"1,2,{n},128", "--topk", "0.03")
    routers = [r for r in rows if r["kernel"] in ("router_key_proj", "router_topk")]
    assert {r["kernel"] for r in routers} == {"router_key_proj", "router_topk"}, rows
    for r in routers:
        assert any("tf32" in m for m in r["mma"]), r["mma"]
        assert r["spill_instructions"] == 0 and r["registers"] <= 255, r


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("shape,layout,mixing", [("1,12,32760,128", "bnhd", "head"), ("2,3,4001,64", "bhnd", "head"),
                                                 ("1,12,32760,128", "bhnd", "query-linear")])
def test_gluon_backward_launches_compile_for_sm90(tmp_path, python, shape, layout, mixing):
    """LaunchConfig.dkdv_gluon and dq_gluon: one Gluon launch replaces the two sparse dK / dV launches and one
    the sparse dQ launch; their tiles come by TMA, every product runs on wgmma with an MMA left in flight past
    a wait, and the accumulators fit one warpgroup without spills, two programs per SM."""
    rows = _report(tmp_path, python, "--shape", shape, "--topk", "0.03", "--backward", "--layout", layout,
                   "--mixing", mixing, "--config", json.dumps({"dkdv_gluon": 1, "dq_gluon": 1}))
    names = {r["kernel"] for r in rows}
    assert {"bwd_dkdv_gluon_kernel", "bwd_dq_gluon_kernel"} <= names, names
    assert not {"bwd_dkdv_kernel", "bwd_dq_kernel"} & names, names
    for r in rows:
        if r["kernel"] in ("bwd_dkdv_gluon_kernel", "bwd_dq_gluon_kernel"):
            assert r["tma_loads"] > 0 and any(m.startswith("wgmma") for m in r["mma"]), r
            assert r["wgmma_waits"].get("1", 0) > 0, r["wgmma_waits"]
            assert r["spill_instructions"] == 0 and r["ctas_per_sm"] >= 2, r
