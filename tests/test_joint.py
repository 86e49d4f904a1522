"""Joint text-visual attention (docs/design.md section 1) against an independent fp64 oracle.

Text queries attend densely to every real key; visual queries keep every text key exactly and route among
the visual key blocks; padded text keys take no part; the visual segment starts on a block boundary (text
given first stays first only if it fills whole query and key blocks, else it moves behind the visual tokens).
"""

from __future__ import annotations

import math

import pytest
import torch

from slaconv.config import SLA2Config
from slaconv.processor import SLA2Processor
from test_reference import fp64_sla2

HEADS = 2


def _processor(head_dim, topk, bq, bk, seed):
    proc = SLA2Processor(HEADS, head_dim, SLA2Config(topk=topk, block_q=bq, block_k=bk, quant="none"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proc.router_q.add_(0.3 * torch.randn(HEADS, head_dim, head_dim, generator=g))
        proc.router_k.add_(0.3 * torch.randn(HEADS, head_dim, head_dim, generator=g))
        proc.alpha_logit.copy_(torch.randn(HEADS, generator=g))
    return proc


def _qkv(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, HEADS, d, generator=g) for _ in range(3))
    return q, k + 0.5, v


def _dense64(q, k, v):
    """(H, r, D) queries over (H, n, D) keys, fp64 softmax."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v.double()


def joint_oracle(q, k, v, proc, text, text_first, valid=None):
    """The joint SLA2 output (B, N, H, D) in fp64, sample by sample, written from the rules above."""
    b, n, _, _ = q.shape
    visual = n - text
    bq, bk = proc.block_q, proc.block_k
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(b):
        real = text if valid is None else valid[i]
        text_idx = list(range(text)) if text_first else list(range(visual, n))
        vis_idx = list(range(text, n)) if text_first else list(range(visual))
        real_text, pad_text = text_idx[:real], text_idx[real:]
        if text_first and text % bq == 0 and text % bk == 0:
            order, kept = text_idx + vis_idx, (0, text // bk)
        else:
            order, kept = vis_idx + real_text, (visual // bk, math.ceil((visual + real) / bk))
        qc, kc, vc = (t[i, order].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n', D)
        sla, _, _ = fp64_sla2(qc, kc, vc, proc.router_q.detach(), proc.router_k.detach(), proc.alpha_logit.detach(),
                              proc.topk, bq, bk, always_kept=kept)
        sla = sla[0]
        dense = _dense64(qc[0], kc[0], vc[0])
        for pos, token in enumerate(order):
            out[i, token] = (dense if token in real_text else sla)[:, pos]
        for token in pad_text:  # padding queries: dense over the real keys
            out[i, token] = _dense64(q[i, token].unsqueeze(1), kc[0], vc[0])[:, 0]
    return out


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("visual,text,text_first,valid,bq,bk", [
    (200, 40, True, None, 64, 64),      # text first, not whole blocks: moved behind the video
    (200, 64, True, None, 64, 64),      # text first, whole blocks: in place
    (200, 64, True, None, 128, 64),     # ... but not whole query blocks: moved
    (200, 128, True, None, 128, 64),    # whole query and key blocks: in place
    (200, 30, False, None, 64, 64),     # text last: the last video block shares a block with text
    (192, 30, False, None, 128, 64),    # text last, video ends on a block boundary
    (200, 30, False, (30, 17), 64, 64),  # padded text: each sample cut to its real tokens
])
def test_joint_attention_matches_fp64_oracle(visual, text, text_first, valid, bq, bk):
    proc = _processor(16, 0.3, bq, bk, seed=visual + text)
    q, k, v = _qkv(2, visual + text, 16, seed=text + bq)
    with torch.no_grad():
        got = proc.attend_joint(q, k, v, text_tokens=text, text_first=text_first, text_valid=valid)
    want = joint_oracle(q, k, v, proc, text, text_first, valid)
    assert got.shape == q.shape
    assert _rel(got, want) < 1e-5, _rel(got, want)


def test_joint_attention_on_the_triton_kernels():
    """The same on the Triton path (the GPU where there is one, else the interpreter; head dim 64, fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = _processor(64, 0.3, 64, 64, seed=3)
    q, k, v = _qkv(1, 200 + 40, 64, seed=4)
    want = joint_oracle(q, k, v, proc, 40, True)
    proc.to(device).sparse_attention = _with_backend(proc.sparse_attention, "triton")
    with torch.no_grad():
        got = proc.attend_joint(q.to(device), k.to(device), v.to(device), text_tokens=40, text_first=True).cpu()
    # fp32 dots are exact under the interpreter and TF32 (10-bit mantissa) on the GPU
    assert _rel(got, want) < (5e-3 if device == "cuda" else 1e-4), _rel(got, want)


def _with_backend(fn, backend):
    def call(*args, **kwargs):
        return fn(*args, backend=backend, **kwargs)

    return call


def test_query_block_subsets_and_observers_see_the_text():
    """Stage 1 computes chosen query blocks only; the text rows among them are still dense.  An observer is
    shown the text span, and the processor's own methods then apply it."""
    proc = _processor(16, 0.3, 64, 64, seed=7)
    q, k, v = _qkv(1, 200 + 30, 16, seed=8)
    span = (200, 230)
    full = proc.sparse_attention(q, k, v, text_span=span)
    blocks = torch.tensor([1, 3])
    rows = torch.cat([torch.arange(64, 128), torch.arange(192, 230)])
    part = proc.sparse_attention(q, k, v, text_span=span, q_blocks=blocks)
    assert torch.allclose(part, full[:, rows], atol=1e-6)
    seen = {}

    def observer(p, q_, k_, v_):
        seen["span"] = p.text_span
        seen["mask"] = p.block_mask(q_, k_)
        return p.sparse_attention(q_, k_, v_)

    proc.observer = observer
    with torch.no_grad():
        observed = proc.attend_joint(q, k, v, text_tokens=30, text_first=False)
    proc.observer = None
    assert seen["span"] == span and proc.text_span == (0, 0)
    assert seen["mask"][..., 3].all()  # key block 3 (tokens 192..255) holds text: kept in every row
    assert torch.allclose(observed, full.detach(), atol=1e-6)
