"""Alpha per query from the query alone (``mixing: query-linear``): the reference against an fp64 oracle written
from docs/design.md section 1, its gradients, and the setting through processor, recipe, work dir, inspect,
stage 1 and the push check.  The kernels against fp64: tests/test_kernels.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import slaconv
from helpers import assert_row_mixing_matches_oracle, assert_saved_copy_runs_alike, run, write_recipe
from slaconv.config import SLA2Config
from slaconv.kernels import reference as R
from slaconv.kernels.ops import sla2_attention
from slaconv.processor import SLA2Processor
from slaconv.push import check_workdir
from slaconv.recipe import Recipe


def random_inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    wq = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    wk = torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)
    weight = torch.randn(h, d, generator=g, dtype=torch.float64)
    return q, k, v, wq, wk, torch.randn(h, generator=g, dtype=torch.float64), weight


def fp64_query_linear(q, k, v, block_mask, alpha_logit, weight, bq, bk):
    """Per row, with explicit loops over heads and rows: O_s over the selected keys, O_l (phi = softmax over d)
    over the others, alpha_i = sigmoid(q_i . w_h / sqrt(d) + a_h), and O_s alone for a row with every key
    selected.  Differentiable in every input."""
    b, h, n, d = q.shape
    rows = []
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = torch.tensor([bool(block_mask[bi, hi, i // bq, t // bk]) for t in range(n)])
                s = k[bi, hi] @ q[bi, hi, i] / math.sqrt(d)
                o_s = torch.softmax(s[keys], dim=0) @ v[bi, hi][keys]
                if keys.all():
                    rows.append(o_s)
                    continue
                a = torch.sigmoid(q[bi, hi, i] @ weight[hi] / math.sqrt(d) + alpha_logit[hi])
                kern = torch.softmax(k[bi, hi], dim=-1)[~keys] @ torch.softmax(q[bi, hi, i], dim=0)
                o_l = (kern @ v[bi, hi][~keys]) / (kern.sum() + R.LINEAR_EPS)
                rows.append(a * o_s + (1 - a) * o_l)
    return torch.stack(rows).view(b, h, n, d)


@pytest.mark.parametrize("n,bq,bk,topk", [(256, 64, 64, 0.25), (333, 128, 64, 0.3), (200, 64, 64, 1.0)])
def test_query_linear_mixing_and_its_gradients_match_fp64(n, bq, bk, topk):
    seed = int(torch.randint(1 << 30, ()))
    assert_row_mixing_matches_oracle("query-linear", fp64_query_linear, random_inputs(1, 2, n, 16, seed), bq, bk, topk,
                                     seed)


def test_zero_weight_is_alpha_per_head():
    q, k, v, wq, wk, logit, weight = (t.float() for t in random_inputs(2, 3, 300, 32, 3))
    common = dict(topk=0.2, block_q=64, block_k=64)
    per_head = R.sla2_attention_reference(q, k, v, wq, wk, logit, **common)
    linear = R.sla2_attention_reference(q, k, v, wq, wk, logit, mixing="query-linear",
                                        alpha_weight=torch.zeros_like(weight), **common)
    assert torch.allclose(linear, per_head, rtol=0, atol=1e-6)
    moved = R.sla2_attention_reference(q, k, v, wq, wk, logit, mixing="query-linear", alpha_weight=weight, **common)
    assert (moved - per_head).abs().max() > 1e-2


def test_alpha_weight_is_checked():
    q, k, v, wq, wk, logit, weight = (t.float() for t in random_inputs(1, 2, 128, 16, 4))
    with pytest.raises(ValueError, match="needs alpha_weight of shape"):
        R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.5, block_q=64, block_k=64, mixing="query-linear")
    with pytest.raises(ValueError, match="needs alpha_weight of shape"):
        R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.5, block_q=64, block_k=64, mixing="query-linear",
                                   alpha_weight=weight[:, :8])
    with pytest.raises(ValueError, match="read only with mixing 'query-linear'"):
        R.sla2_attention_reference(q, k, v, wq, wk, logit, topk=0.5, block_q=64, block_k=64, alpha_weight=weight)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernels need CUDA or the interpreter")
def test_triton_and_reference_agree():
    """The kernels' path (host-side row logits, read per row by the sparse launch) against the reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, wq, wk, logit, weight = (t.float().to(device) for t in random_inputs(1, 2, 256, 64, 5))
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N, H, D)
    args = (q, k, v, wq, wk, logit)
    kernel = sla2_attention(*args, topk=0.25, backend="triton", mixing="query-linear", alpha_weight=weight)
    ref = sla2_attention(*args, topk=0.25, backend="reference", mixing="query-linear", alpha_weight=weight)
    tolerance = 1e-5 if device == "cpu" else 1e-2  # TF32 products on a GPU
    assert ((kernel - ref).norm() / ref.norm()).item() < tolerance


def test_processor_holds_the_weight_and_refuses_a_switch():
    proc = SLA2Processor(4, 32, SLA2Config(mixing="query-linear"))
    assert torch.equal(proc.alpha_weight, torch.zeros(4, 32)) and "alpha_weight" in proc.sla2_state()
    assert "alpha_weight" not in SLA2Processor(4, 32, SLA2Config()).sla2_state()
    with pytest.raises(ValueError, match="cannot switch the mixing"):
        proc.config = SLA2Config(mixing="head")
    assert Recipe().override({"sla2.mixing": "query-linear"}).sla2.attention_config().mixing == "query-linear"


@pytest.mark.parametrize("mixing,words", [("query-linear", "alpha per query (from the query)"),
                                          ("query-block", "alpha per query (from the query and its block's tail mass)")])
def test_row_weight_work_dir_converts_calibrates_inspects_and_round_trips(tmp_path, tiny_wan_dir, mixing, words):
    """Both mixings with a learned alpha_weight (query-linear; query-block in tests/test_query_block_mixing.py)
    through convert, stage 1, inspect, the push check and a saved copy."""
    work, saved = tmp_path / "w", tmp_path / "saved"
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage2.steps": 0})
    # the tiny model's head dim (24) is not one the kernels take: on a GPU machine too it runs on the CPU
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--mixing", mixing, "--device", "cpu")
    assert json.loads((work / "sla2_config.json").read_text())["mixing"] == mixing
    start = load_file(str(work / "sla2.safetensors"))
    weights = [key for key in start if key.endswith(".alpha_weight")]
    assert weights and all(torch.count_nonzero(start[key]) == 0 for key in weights)
    s1 = json.loads(run("calibrate", work, "--stage", "1", "--json", "--device", "cpu").stdout)["stage1"]
    assert s1["heldout_attention_rel_mse_after"] <= s1["heldout_attention_rel_mse_before"] * 1.02, s1
    stored = load_file(str(work / "sla2.safetensors"))
    assert all(torch.count_nonzero(stored[key]) > 0 for key in weights)  # stage 1 trains them
    shown = run("inspect", work).stdout
    assert words in shown and "|alpha weight|" in shown
    norms = json.loads(run("inspect", work, "--json").stdout)["layers"][0]["alpha_weight_norm"]
    assert len(norms) == stored[weights[0]].shape[0] and min(norms) > 0
    check_workdir(work)
    save_file({key: t for key, t in stored.items() if key != weights[0]}, str(tmp_path / "partial.safetensors"))
    assert_saved_copy_runs_alike(work, saved)
    (work / "sla2.safetensors").write_bytes((tmp_path / "partial.safetensors").read_bytes())
    with pytest.raises(slaconv.errors.InputError, match="lacks .*alpha_weight"):
        check_workdir(work)
