"""The per-layer sparsity budget: the mass statistic, the greedy allocation, convert, inspect, the work dir."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import slaconv
from helpers import fails, run, write_recipe
from slaconv.budget import allocate_blocks, block_mass_curve, per_layer_budget, tail_proportional_blocks
from slaconv.install import sla2_processors
from slaconv.kernels import reference
from slaconv.workdir import WorkDir


def brute_force_curve(q, k, block_q, block_k, always_kept, query_blocks):
    """float64, one query block and head at a time, from the dense probability matrix."""
    b, h, n, d = q.shape
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / d ** 0.5, dim=-1)
    nk = -(-k.shape[2] // block_k)
    start, end = always_kept
    curves = []
    for bi, hi, qb in itertools.product(range(b), range(h), query_blocks.tolist()):
        rows = p[bi, hi, qb * block_q:(qb + 1) * block_q]
        mass = torch.stack([rows[:, j * block_k:(j + 1) * block_k].sum(-1).mean() for j in range(nk)])
        mass = torch.cat([mass[:start], mass[end:]])
        curves.append(torch.cat([mass.new_zeros(1), mass.sort(descending=True).values.cumsum(0)]))
    return torch.stack(curves).mean(0)


@pytest.mark.parametrize("n,always_kept", [(512, (0, 0)), (450, (0, 0)), (448, (6, 7))])
def test_block_mass_curve_matches_float64_reference(n, always_kept):
    g = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 3, n, 16, generator=g) * 2 for _ in range(2))
    picked = torch.tensor([0, 2, 3])
    got = block_mass_curve(q, k, 64, 64, always_kept, picked)
    want = brute_force_curve(q, k, 64, 64, always_kept, picked)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert torch.all(got[1:] >= got[:-1] - 1e-6)  # more blocks never hold less
    if always_kept == (0, 0):
        assert abs(float(got[-1]) - 1) < 1e-5  # every block: the whole row


def concave_curve(gains):
    gains = torch.tensor(sorted(gains, reverse=True), dtype=torch.float64)
    return torch.cat([gains.new_zeros(1), gains.cumsum(0)])


def test_greedy_allocation_is_the_best_split_of_the_blocks():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        curves = {f"l{i}": concave_curve(torch.rand(6, generator=g).tolist()) for i in range(3)}
        for total in (3, 7, 12, 18):
            counts = allocate_blocks(curves, total)
            assert sum(counts.values()) == total and all(1 <= c <= 6 for c in counts.values())
            best = max(sum(float(curves[f"l{i}"][c]) for i, c in enumerate(split))
                       for split in itertools.product(range(1, 7), repeat=3) if sum(split) == total)
            assert sum(float(curves[n][c]) for n, c in counts.items()) == pytest.approx(best, abs=1e-12)


def test_blocks_go_where_the_next_block_holds_the_most_mass_same_total():
    m = 32
    diffuse = torch.linspace(0, 1, m + 1)  # every block holds 1/m
    sharp = concave_curve([0.6, 0.2] + [0.2 / (m - 2)] * (m - 2))
    middle = concave_curve([0.3] + [0.7 / (m - 1)] * (m - 1))
    curves = {"sharp": sharp, "middle": middle, "diffuse": diffuse}
    fractions, record = per_layer_budget(curves, topk=0.125)  # 4 of 32 blocks in every layer, uniformly
    blocks = {name: x["blocks"] for name, x in record["layers"].items()}
    assert sum(blocks.values()) == 3 * 4
    assert blocks["sharp"] < 4 < blocks["diffuse"]
    assert sum(x["mass_allocated"] for x in record["layers"].values()) > sum(
        x["mass_uniform"] for x in record["layers"].values())
    for name, fraction in fractions.items():  # the fraction the kernels read gives the count back exactly
        assert reference.topk_count(fraction, m) == blocks[name]


def test_tail_proportional_gives_diffuse_layers_more_same_total():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        curves = {f"l{i}": concave_curve((torch.rand(16, generator=g) ** (1 + 4 * i)).tolist()) for i in range(4)}
        curves = {n: c / c[-1] for n, c in curves.items()}  # each row's mass sums to 1
        uniform = dict.fromkeys(curves, 3)
        counts = tail_proportional_blocks(curves, uniform)
        assert sum(counts.values()) == 12 and all(1 <= c <= 16 for c in counts.values())
        tails = {n: 1 - float(c[3]) for n, c in curves.items()}
        for a, b in itertools.combinations(curves, 2):  # more left out at the uniform count: at least as many
            if tails[a] > tails[b]:
                assert counts[a] >= counts[b]
        shares = {n: 12 * t / sum(tails.values()) for n, t in tails.items()}
        assert all(abs(counts[n] - shares[n]) < 1 + 1e-9 for n in curves if shares[n] >= 1)


def test_allocation_refuses_an_impossible_total():
    curves = {"a": concave_curve([0.5, 0.5]), "b": concave_curve([1.0])}
    with pytest.raises(ValueError, match="cannot spend 4 key blocks"):
        allocate_blocks(curves, 4)


def per_layer_recipe(tmp_path, **extra):
    # 2 x 32 x 32 latents: 512 tokens, 8 key blocks of 64 per layer; top-k 0.25 = 2 blocks
    return write_recipe(tmp_path / "r.yaml", **{"sla2.budget": "per_layer", "sla2.topk": 0.25, "data.height": 32,
                                                "data.width": 32, **extra})


@pytest.mark.parametrize("method", ["per_layer", "per_layer_tail"])
def test_convert_allocates_per_layer_and_the_work_dir_round_trips(tmp_path, tiny_wan_dir, method):
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", per_layer_recipe(tmp_path, **{"sla2.budget": method}))
    stored = json.loads((work / "sla2_config.json").read_text())
    layers = stored["budget"]["layers"]
    assert stored["budget"]["method"] == method and set(layers) == set(stored["layers"])
    assert sum(x["blocks"] for x in layers.values()) == sum(x["uniform_blocks"] for x in layers.values()) == 2 * 2
    if method == "per_layer":  # the most mass any split of these blocks keeps
        assert sum(x["mass_allocated"] for x in layers.values()) >= sum(x["mass_uniform"] for x in layers.values())
    assert stored["topk_per_layer"] == {name: x["blocks"] / 8 for name, x in layers.items()}

    model = slaconv.from_pretrained(work)
    for name, proc in sla2_processors(model).items():
        assert proc.topk == stored["topk_per_layer"][name]
    config = WorkDir(work).read_sla2_config()
    assert config.budget == stored["budget"]
    text = (work / "sla2_config.json").read_text()
    WorkDir(work).write_sla2_config(config)
    assert (work / "sla2_config.json").read_text() == text

    shown = run("inspect", work).output
    assert f"budget {method}" in shown
    assert all(f"({x['blocks']} blocks)" in shown for x in layers.values())

    run("calibrate", work)  # both stages keep the allocation
    after = json.loads((work / "sla2_config.json").read_text())
    assert after["topk_per_layer"] == stored["topk_per_layer"] and after["budget"] == stored["budget"]


def test_uniform_budget_writes_no_budget_record(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", per_layer_recipe(tmp_path, **{"sla2.budget": "uniform"}))
    stored = json.loads((work / "sla2_config.json").read_text())
    assert "budget" not in stored and stored["topk_per_layer"] == {}
    assert WorkDir(work).read_sla2_config().budget is None
    assert "budget per_layer" not in run("inspect", work).output


def test_budget_recipe_values_are_checked(tmp_path, tiny_wan_dir):
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "a", "--recipe",
          per_layer_recipe(tmp_path, **{"sla2.budget": "per_head"}), match="sla2.budget must be one of")
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "b", "--recipe",
          per_layer_recipe(tmp_path, **{"sla2.topk_per_layer": {"blocks.0.attn1": 0.5}}),
          match="leave sla2.topk_per_layer empty")
