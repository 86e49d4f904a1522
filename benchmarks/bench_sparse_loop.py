"""Where the sparse loop's ceiling is on one GPU: SLA2's sparse launch, its warp-specialized rebuild,
FlexAttention and cuDNN's block-sparse attention on one LUT, with dense SDPA as the reference line.

    python benchmarks/bench_sparse_loop.py [--shape 1,12,32760,128] [--topk 0.03 0.05 0.1]
                                           [--layout bnhd] [--reps 50] [--out DIR]

One SLA2 forward per top-k (the real router pre-pass: identity router weights on random bf16 Q, K, V)
gives the LUT, the (batch, head, 128-query block) lists of selected 64-key blocks, and every row below runs
on those tensors and that LUT, in one process:

  plain sparse launch      ``fwd_sparse_kernel`` alone (the sparse loop and its mix epilogue), replayed
                           with the arguments the forward launched it with
  warp-specialized         ``fwd_sparse_ws_kernel`` alone, and with the ``psi_rows`` pass it needs
                           (``slaconv/kernels/sla2_triton_ws.py``)
  Gluon                    ``fwd_sparse_gluon_kernel`` alone (``slaconv/kernels/sla2_gluon.py``: TMA
                           producer, two ping-ponging wgmma consumer warpgroups, the mix epilogue), five
                           schedules: one program per query tile or persistent (one per SM), the serial or
                           the overlapped (QK^T(j+1) during softmax(j)) loop, a K/V ring of 3 or (the
                           launch's own) 4 slots; a failure to compile or run is a failed row, the others
                           still run
  plain / Gluon int8-fp8   the same two launches with ``quant="int8-fp8"`` (INT8 QK^T, FP8 PV) on the
                           same LUT: the persistent, overlapped Gluon schedule only
  SLA2 forward             the whole op (router, pre-passes, linear and sparse launches), plain,
                           ``sparse_ws=1`` and ``sparse_gluon=1``, for scale
  flex                     compiled ``flex_attention`` with ``BlockMask.from_kv_blocks(...,
                           BLOCK_SIZE=(128, 64))``: the LUT as full blocks (no mask_mod), and as
                           partial blocks (a no-op mask_mod applied)
  cuDNN bf16 / FP8         ``cudnn.block_sparse_attention`` (nvidia-cudnn-frontend, the ``bench`` extra):
                           64x64 blocks, so each LUT row serves both 64-query halves of its block; on
                           contiguous (B, H, N, D) copies, Q zero-padded to a multiple of 64 rows.  FP8 (Sage: quantised QK and PV) needs
                           whole 64-key blocks: K and V are zero-padded too, so rows that select the ragged
                           last block also see its padding keys (logit 0, value 0)
  dense cuDNN / Flash      torch SDPA over all N keys

**Sparse work**, the one throughput measure of the sparse rows: the LUT selects P = B*H*nq*n_sel (query
block, key block) pairs, and each costs a 128 x 64 x D QK^T and a 128 x D x 64 PV, 2 flops per multiply-add:
``sparse flops = 4 * B * H * selected_pairs * 128 * 64 * D``, ragged last blocks counted whole (at
(1, 12, 32760, 128), 97%: 15 of 512 key blocks, 193.3 GFLOP).  A row's TFLOP/s is that over its time; the
dense rows give 4 * B * H * N^2 * D over theirs.

**Numerics**: each row's output against an fp32 block-sparse softmax on the same LUT (dense rows: full
softmax), rel. L2 over 16 query blocks spread over N (the first and the ragged last included), all heads.
The SLA2 rows run with alpha = 1 (logit 30: sigmoid is 1.0 in fp32), which makes their output exactly O_s.

**Timing**: CUDA events around each call, after warm-up; a 256 MB buffer is zeroed before every call,
outside the timed span, so no call starts with its inputs in L2; the median of ``--reps``.  Writes
``sparse_loop.json`` and ``sparse_loop.md`` to ``--out`` (default $OUT or ./bench_out).

Predictions, written before the first run (H100 SXM, (1, 12, 32760, 128), sparse TFLOP/s at 97 / 95 / 90%):
plain sparse launch 275 / 300 / 320 (the kernels README's profile: 0.71 ms at 97%); warp-specialized alone
350 / 390 / 420, with its row pass 310 / 360 / 400; flex, full blocks 260 / 280 / 300, partial a little lower;
cuDNN bf16 430 / 470 / 500 and FP8 550 / 620 / 680 (if its wheels are installed at all); dense: cuDNN
about 560 and Flash about 360 dense TFLOP/s.

Predictions for the five Gluon schedules, written before their first run (H100, same shape, sparse TFLOP/s
at 97 / 90%; the earlier per-tile serial kernel, 3 slots, measured 297 / 415): program per tile, serial
loop, 3 slots 295 / 410; per tile, overlapped (4 slots) 340 / 470; persistent, serial 330 / 440; persistent
+ overlapped, 3 slots 360 / 460; persistent + overlapped, 4 slots 400 / 500; int8-fp8: plain 330 / 450,
Gluon 450 / 600.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from slaconv.kernels import sla2_gluon as gluon_kernels
from slaconv.kernels import sla2_triton as S
from slaconv.kernels import sla2_triton_forward as forward_kernels
from slaconv.kernels import sla2_triton_ws as ws_kernels
from slaconv.kernels.launch import DEFAULT_LAUNCH, PLAIN_LAUNCH
from slaconv.kernels.spec import AttentionSpec

BLOCK_Q, BLOCK_K = 128, 64
ALPHA_ONE_LOGIT = 30.0  # sigmoid(30) rounds to 1.0 in fp32: the SLA2 output is O_s, comparable to the others
WS_LAUNCH = dataclasses.replace(DEFAULT_LAUNCH, sparse_ws=1)
GLUON_LAUNCH = dataclasses.replace(DEFAULT_LAUNCH, sparse_gluon=1)
CUDNN_WHEELS = ("nvidia-cudnn-frontend>=1.32 (the bench extra) with nvidia-cutlass-dsl[cu13] and apache-tvm-ffi, "
                "about 115 MB of wheels for py3.12 (benchmarks/gpu_setup.sh)")


def sparse_flops(lut: torch.Tensor, head_dim: int) -> float:
    """4 * B * H * selected_pairs * 128 * 64 * D (the module docstring's definition)."""
    return 4.0 * lut.numel() * BLOCK_Q * BLOCK_K * head_dim


def time_ms(fn, reps: int, flush: torch.Tensor) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls timed by CUDA events, L2 flushed before each."""
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


# --------------------------------------------------------------------------------------------------
# the SLA2 launches, replayed with the arguments one forward gave them
# --------------------------------------------------------------------------------------------------


class _Capturing:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kw)`` runs it and keeps the call for replay."""

    def __init__(self, kernel, calls: dict):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[self.kernel.__name__] = (self.kernel, grid, args, kwargs)
            self.kernel[grid](*args, **kwargs)

        return launch


def captured_launches(run, kernels) -> dict:
    """Run ``run()`` with each ``(module, name)`` kernel of ``kernels`` captured; returns name -> launch."""
    calls = {}
    originals = [(module, name, getattr(module, name)) for module, name in kernels]
    try:
        for module, name, kernel in originals:
            setattr(module, name, _Capturing(kernel, calls))
        run()
    finally:
        for module, name, kernel in originals:
            setattr(module, name, kernel)
    return calls


def replay(call):
    kernel, grid, args, kwargs = call
    return lambda: kernel[grid](*args, **kwargs)


def argument(call, name: str):
    kernel, _, args, _ = call
    return dict(zip(kernel.arg_names, args))[name]


def sla2_rows(q, k, v, topk: float, layout: str, gluon: bool = True):
    """The LUT of one SLA2 forward and the SLA2 rows on it: (name, fn, output fn) each, the output
    (B, H, N, D).  ``gluon=False`` leaves the Gluon rows out (a kernel that hangs cannot be stopped in-process)."""
    H, D = q.shape[2 if layout == "bnhd" else 1], q.shape[-1]

    def bhnd(o):
        return o.transpose(1, 2) if layout == "bnhd" else o

    eye = torch.eye(D, device=q.device).expand(H, D, D).contiguous()
    alpha_logit = torch.full((H,), ALPHA_ONE_LOGIT, device=q.device)
    spec = AttentionSpec(topk, BLOCK_Q, BLOCK_K, "none")

    def op(launch):
        return lambda: S.forward(q, k, v, eye, eye, alpha_logit, spec, layout, False, launch)[0]

    plain = captured_launches(op(PLAIN_LAUNCH), [(forward_kernels, "fwd_sparse_kernel")])["fwd_sparse_kernel"]
    ws = captured_launches(op(WS_LAUNCH), [(ws_kernels, "psi_rows"), (ws_kernels, "fwd_sparse_ws_kernel")])
    lut = argument(plain, "LUT")
    if not torch.equal(lut, argument(ws["fwd_sparse_ws_kernel"], "LUT")):
        raise RuntimeError("the two forwards built different LUTs")
    allocate = ws_kernels.scratch_allocator(q.device)
    ws_loop = replay(ws["fwd_sparse_ws_kernel"])
    psi_pass = replay(ws["psi_rows"])

    def ws_alone():
        triton.set_allocator(allocate)  # a compiled flex_attention may install its own in between
        ws_loop()

    def ws_with_rows():
        psi_pass()
        ws_alone()

    o_plain, o_ws = argument(plain, "O"), argument(ws["fwd_sparse_ws_kernel"], "O")
    rows = [
        ("plain sparse launch", replay(plain), lambda: bhnd(o_plain)),
        ("warp-specialized sparse launch", ws_alone, lambda: bhnd(o_ws)),
        ("warp-specialized + psi row pass", ws_with_rows, lambda: bhnd(o_ws)),
    ]
    whole_ops = [("SLA2 forward, whole op, plain", PLAIN_LAUNCH), ("SLA2 forward, whole op, sparse_ws=1", WS_LAUNCH)]
    if gluon:
        rows += gluon_rows(op(GLUON_LAUNCH), lut, allocate, bhnd)
        whole_ops.append(("SLA2 forward, whole op, sparse_gluon=1", GLUON_LAUNCH))
    # the low-bit sparse loops: INT8 QK^T and FP8 PV on the same LUT (the router does not quantise)
    spec_lowbit = AttentionSpec(topk, BLOCK_Q, BLOCK_K, "int8-fp8")

    def op_lowbit(launch):
        return lambda: S.forward(q, k, v, eye, eye, alpha_logit, spec_lowbit, layout, False, launch)[0]

    plain_lowbit = captured_launches(op_lowbit(PLAIN_LAUNCH), [(forward_kernels, "fwd_sparse_kernel")])
    plain_lowbit = plain_lowbit["fwd_sparse_kernel"]
    if not torch.equal(lut, argument(plain_lowbit, "LUT")):
        raise RuntimeError("the int8-fp8 forward built a different LUT")
    o_plain_lowbit = argument(plain_lowbit, "O")
    rows.append(("plain sparse launch, int8-fp8", replay(plain_lowbit), lambda: bhnd(o_plain_lowbit)))
    if gluon:
        rows += gluon_rows(op_lowbit(GLUON_LAUNCH), lut, allocate, bhnd, GLUON_LOWBIT_SCHEDULES)
    for name, launch in whole_ops:
        outputs = {}
        run = op(launch)

        def whole(run=run, outputs=outputs):
            outputs["o"] = run()

        rows.append((name, whole, lambda outputs=outputs: bhnd(outputs["o"])))
    return lut, rows


GLUON_SCHEDULES = (
    # (row, one program per work item?, OVERLAP, K/V ring slots or None for the launch's own): the schedule
    # sparse_gluon=1 runs is the last; the first is the earlier kernel's (per tile, serial, 3 slots)
    ("Gluon, program per tile, serial loop, 3 slots", True, False, 3),
    ("Gluon, program per tile, overlapped loop", True, True, None),
    ("Gluon, persistent, serial loop", False, False, None),
    ("Gluon, persistent + overlapped loop, 3 slots", False, True, 3),
    ("Gluon, persistent + overlapped loop (sparse_gluon=1)", False, True, None),
)
GLUON_LOWBIT_SCHEDULES = (("Gluon int8-fp8, persistent + overlapped (sparse_gluon=1)", False, True, None), )


def gluon_rows(run, lut, allocate, bhnd, schedules=GLUON_SCHEDULES):
    """The Gluon sparse launch alone under each of ``schedules`` (:data:`GLUON_SCHEDULES`), replayed from
    one forward of ``run`` with the grid (one program per (query tile, batch*head) item, or the persistent
    one the forward launched), the loop (``OVERLAP``) and the ring depth (``STAGES``) of the row.  If that
    forward fails (the kernel does not compile or launch), rows whose calls raise the same error, so the
    table records it."""
    try:
        call = captured_launches(run, [(gluon_kernels, "fwd_sparse_gluon_kernel")])["fwd_sparse_gluon_kernel"]
        if not torch.equal(lut, argument(call, "LUT")):
            raise RuntimeError("the Gluon forward built a different LUT")
    except Exception as exc:  # noqa: BLE001 - reported as failed rows by measure()
        print(f"Gluon rows: the capturing forward failed: {type(exc).__name__}: {str(exc)[:300]}")
        error = exc

        def fail():
            raise error

        def no_output():
            raise KeyError("Gluon")  # _poison: nothing to poison

        return [(name, fail, no_output) for name, *_ in schedules]
    kernel, persistent_grid, args, kwargs = call
    items = (math.prod(lut.shape[:-1]), )
    o_gluon = argument(call, "O")
    rows = []
    for name, per_item, overlap, slots in schedules:
        schedule = {"OVERLAP": overlap} | ({"STAGES": slots} if slots else {})
        loop = replay((kernel, items if per_item else persistent_grid, args, kwargs | schedule))

        def alone(loop=loop):
            triton.set_allocator(allocate)
            loop()

        rows.append((name, alone, lambda: bhnd(o_gluon)))
    return rows


# --------------------------------------------------------------------------------------------------
# the yardsticks on the same LUT
# --------------------------------------------------------------------------------------------------


_compiled_flex = None


def flex_rows(qh, kh, vh, lut):
    """Compiled FlexAttention with the LUT as full blocks and as partial (mask_mod) blocks."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    B, H, nq, n_sel = lut.shape
    n = qh.shape[2]
    nk = math.ceil(n / BLOCK_K)
    indices = torch.zeros(B, H, nq, nk, dtype=torch.int32, device=lut.device)
    indices[..., :n_sel] = lut
    counts = torch.full((B, H, nq), n_sel, dtype=torch.int32, device=lut.device)
    none = torch.zeros_like(counts)
    masks = {
        "flex, full blocks": BlockMask.from_kv_blocks(none, indices, counts, indices, BLOCK_SIZE=(BLOCK_Q, BLOCK_K),
                                                      seq_lengths=(n, n)),
        "flex, partial blocks (no-op mask_mod)": BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(BLOCK_Q, BLOCK_K),
                                                                          seq_lengths=(n, n)),
    }
    rows = []
    for name, mask in masks.items():
        outputs = {}

        def run(mask=mask, outputs=outputs):
            outputs["o"] = _compiled_flex(qh, kh, vh, block_mask=mask)

        rows.append((name, run, lambda outputs=outputs: outputs["o"]))
    return rows


def _pad_tokens(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, n_pad, D), zero rows appended."""
    return torch.nn.functional.pad(x, (0, 0, 0, n_pad - x.shape[2])).contiguous()


def cudnn_rows(q, k, v, lut, layout: str):
    """cuDNN's block-sparse forward, bf16 and FP8, on the LUT at 64 x 64 blocks; (name, fn, output fn) rows,
    or (name, reason) pairs of rows that cannot run here."""
    names = ("cuDNN block-sparse bf16", "cuDNN block-sparse FP8 (Sage)")
    try:
        from cudnn.block_sparse_attention import (
            block_sparse_attention_forward,
            block_sparse_attention_fp8_forward,
        )
    except Exception as exc:  # noqa: BLE001 - any import failure means the yardstick is absent
        reason = f"{type(exc).__name__}: {str(exc)[:120]}; needs {CUDNN_WHEELS}"
        return [], [(name, reason) for name in names]
    # contiguous (B, H, N, D) copies for both (the FP8 path takes no other layout), made once, outside the timing
    qh, kh, vh = ((t.transpose(1, 2) if layout == "bnhd" else t).contiguous() for t in (q, k, v))
    n = qh.shape[2]
    n_pad = math.ceil(n / 64) * 64
    n_sel = lut.shape[-1]
    q2k = lut.repeat_interleave(2, dim=2)[:, :, : n_pad // 64].contiguous()  # both 64-query halves of a block
    q_pad, k_pad, v_pad = (_pad_tokens(t, n_pad) for t in (qh, kh, vh))
    outputs = {}

    def bf16():  # ragged keys: the kernel bounds the last key block by K's length
        outputs["bf16"] = block_sparse_attention_forward(q_pad, kh, vh, q2k, n_sel, sparse_block_size=64)["o_tensor"]

    def fp8():
        outputs["fp8"] = block_sparse_attention_fp8_forward(q_pad, k_pad, v_pad, q2k, n_sel, sparse_block_size=64)["o_tensor"]

    return [(names[0], bf16, lambda: outputs["bf16"][:, :, :n]), (names[1], fp8, lambda: outputs["fp8"][:, :, :n])], []


def dense_rows(qh, kh, vh):
    rows = []
    for name, backend in (("dense SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("dense SDPA Flash", SDPBackend.FLASH_ATTENTION)):
        outputs = {}

        def run(backend=backend, outputs=outputs):
            with sdpa_kernel(backend):
                outputs["o"] = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

        rows.append((name, run, lambda outputs=outputs: outputs["o"]))
    return rows


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def sample_blocks(n: int) -> torch.Tensor:
    nq = math.ceil(n / BLOCK_Q)
    return torch.linspace(0, nq - 1, 16).round().long().unique()


def block_rows(q_blocks: torch.Tensor, n: int) -> torch.Tensor:
    rows = (q_blocks.view(-1, 1) * BLOCK_Q + torch.arange(BLOCK_Q)).view(-1)
    return rows[rows < n]


def reference_rows(qh, kh, vh, lut, q_blocks):
    """fp32 softmax attention of the sampled query blocks (B, H, rows, D): over the LUT's key blocks, or over
    every key if ``lut`` is None."""
    n, d = qh.shape[2], qh.shape[3]
    out = []
    for qb in q_blocks.tolist():
        q = qh[:, :, qb * BLOCK_Q: min(n, (qb + 1) * BLOCK_Q)].float()
        if lut is None:
            keys, values, valid = kh.float(), vh.float(), None
        else:
            cols = (lut[:, :, qb, :, None].long() * BLOCK_K + torch.arange(BLOCK_K, device=lut.device)).flatten(-2)
            valid = cols < n
            index = cols.clamp(max=n - 1)[..., None].expand(-1, -1, -1, d)
            keys, values = kh.gather(2, index).float(), vh.gather(2, index).float()
        s = q @ keys.transpose(-1, -2) / math.sqrt(d)
        if valid is not None:
            s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
        out.append(torch.softmax(s, dim=-1) @ values)
    return torch.cat(out, dim=2)


def rel_l2(out_bhnd, ref, rows) -> float:
    got = out_bhnd[:, :, rows].double()
    return ((got - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------


def _poison(output) -> None:
    """NaN in an output buffer a row rewrites in place (the replayed launches), so its check reads what the
    timed calls wrote, not what the forward that captured the launch left there."""
    try:
        output().fill_(float("nan"))
    except KeyError:  # rows whose output appears with their first call
        pass


def measure(rows, flops, dense_flops, ref, sample, reps, flush, kind):
    """Time and check each (name, fn, output) row; a row that raises is recorded as failed, not skipped."""
    results = []
    for name, fn, output in rows:
        rec = {"row": name, "kind": kind}
        try:
            _poison(output)
            rec["ms"] = time_ms(fn, reps, flush)
            rec["rel_l2"] = rel_l2(output(), ref, sample)
        except Exception as exc:  # noqa: BLE001 - the table says which row failed and why
            rec["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"{name}: failed: {rec['failed']}")
            results.append(rec)
            continue
        rec["tflops_sparse"] = flops / rec["ms"] / 1e9 if flops else None
        rec["tflops_dense"] = dense_flops / rec["ms"] / 1e9
        print(f"{name:42s} {rec['ms']:8.3f} ms  sparse {rec['tflops_sparse'] or 0:6.0f} TFLOP/s  "
              f"rel_l2 {rec['rel_l2']:.2e}")
        results.append(rec)
    return results


def markdown(report) -> str:
    lines = [f"card: {report['card']}; torch {report['torch']}, triton {report['triton']}; shape "
             f"{report['shape']} {report['layout']}; median of {report['reps']} calls, L2 flushed", "",
             "| sparsity | n_sel | row | ms | sparse TFLOP/s | x dense cuDNN | rel. L2 |", "|---|---:|---|---:|---:|---:|---:|"]
    cudnn_ms = next((r["ms"] for r in report["dense"] if r["row"] == "dense SDPA cuDNN" and "ms" in r), None)
    for part in report["sparse"]:
        for r in part["rows"]:
            head = f"| {part['sparsity']:.1%} | {part['n_sel']} | {r['row']} |"
            if "ms" not in r:
                why = f"failed: {r['failed']}" if "failed" in r else f"not run: {r['not_run']}"
                lines.append(f"{head} {why} | | | |")
                continue
            speedup = f"{cudnn_ms / r['ms']:.1f}" if cudnn_ms else ""
            lines.append(f"{head} {r['ms']:.3f} | {r['tflops_sparse']:.0f} | {speedup} | {r['rel_l2']:.1e} |")
    lines += ["", "| dense row | ms | dense TFLOP/s | rel. L2 |", "|---|---:|---:|---:|"]
    for r in report["dense"]:
        if "ms" in r:
            lines.append(f"| {r['row']} | {r['ms']:.3f} | {r['tflops_dense']:.0f} | {r['rel_l2']:.1e} |")
        else:
            lines.append(f"| {r['row']} | failed: {r['failed']} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,12,32760,128", help="B,H,N,D (default: Wan2.1-1.3B at 480p)")
    ap.add_argument("--topk", type=float, nargs="+", default=[0.03, 0.05, 0.10], help="97/95/90%% sparsity")
    ap.add_argument("--layout", default="bnhd", choices=["bnhd", "bhnd"], help="layout of Q, K, V (diffusers: bnhd)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-gluon", action="store_true", help="leave out the Gluon rows")
    a = ap.parse_args(argv)
    B, H, N, D = (int(x) for x in a.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, N, H, D) if a.layout == "bnhd" else (B, H, N, D)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = ((t.transpose(1, 2) if a.layout == "bnhd" else t) for t in (q, k, v))  # (B, H, N, D) views
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    sample = sample_blocks(N)
    rows_of_sample = block_rows(sample, N).cuda()
    dense_flops = 4.0 * B * H * N * N * D

    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": [B, H, N, D], "layout": a.layout, "reps": a.reps,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "flops": "sparse: 4 * B * H * selected_pairs * 128 * 64 * D; dense: 4 * B * H * N^2 * D", "sparse": []}
    print(f"{report['card']}, torch {report['torch']}, triton {report['triton']}, shape {B, H, N, D} {a.layout}")
    ref_dense = reference_rows(qh, kh, vh, None, sample)
    report["dense"] = measure(dense_rows(qh, kh, vh), 0.0, dense_flops, ref_dense, rows_of_sample, max(10, a.reps // 5),
                              flush, "dense")
    del ref_dense
    for topk in a.topk:
        lut, rows = sla2_rows(q, k, v, topk, a.layout, gluon=not a.no_gluon)
        n_sel, nk = lut.shape[-1], math.ceil(N / BLOCK_K)
        flops = sparse_flops(lut, D)
        print(f"--- top-k {topk}: {n_sel} of {nk} key blocks ({1 - n_sel / nk:.1%} sparse), {flops / 1e9:.1f} GFLOP")
        ref = reference_rows(qh, kh, vh, lut, sample)
        rows += flex_rows(qh, kh, vh, lut)
        cudnn, not_run = cudnn_rows(q, k, v, lut, a.layout)
        measured = measure(rows + cudnn, flops, dense_flops, ref, rows_of_sample, a.reps, flush, "sparse")
        measured += [{"row": name, "kind": "sparse", "not_run": reason} for name, reason in not_run]
        for name, reason in not_run:
            print(f"{name}: not run: {reason}")
        report["sparse"].append({"topk": topk, "n_sel": n_sel, "n_kblocks": nk, "sparsity": 1 - n_sel / nk,
                                 "sparse_gflop": flops / 1e9, "rows": measured})
        del rows, cudnn, ref
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_loop.json").write_text(json.dumps(report, indent=1))
    (out / "sparse_loop.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
