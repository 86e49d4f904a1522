"""Token tiles (``sla2.token_tile``): the permutation, the Wan hooks that apply it, and the setting end to end."""

from __future__ import annotations

import json

import pytest
import torch

import slaconv
from helpers import fails, make_wan, run, write_recipe
from slaconv.config import SLA2Config
from slaconv.errors import RecipeError
from slaconv.install import set_mode, sla2_processors
from slaconv.recipe import Recipe
from slaconv.token_order import TokenOrder, parse_tile, tile_permutation
from slaconv.workdir import WorkDir

GRID = (2, 9, 11)  # the tiny Wan's tokens for (2, 18, 22) latents: 198
LATENTS = (1, 4, 2, 18, 22)


def _coords(grid):
    f, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    return f.reshape(-1), h.reshape(-1), w.reshape(-1)


@pytest.mark.parametrize("grid,tile", [((8, 32, 32), (4, 4, 4)), ((8, 32, 32), (1, 8, 8)), ((3, 5, 7), (2, 2, 3)),
                                       ((21, 30, 52), (4, 4, 4)), (GRID, (1, 1, 1))])
def test_tiles_are_contiguous_and_compact(grid, tile):
    order = tile_permutation(grid, tile)
    assert torch.equal(order.sort().values, torch.arange(grid[0] * grid[1] * grid[2]))
    f, h, w = (c[order] for c in _coords(grid))
    tile_id = [(int(a) // tile[0], int(b) // tile[1], int(c) // tile[2]) for a, b, c in zip(f, h, w)]
    starts = [0] + [i for i in range(1, len(tile_id)) if tile_id[i] != tile_id[i - 1]]
    runs = [tile_id[i] for i in starts]
    assert len(runs) == len(set(runs))  # each tile's tokens are one run of the sequence
    whole = [all((t + 1) * s <= g for t, s, g in zip(r, tile, grid)) for r in runs]
    assert whole == sorted(whole, reverse=True)  # whole tiles first, then the edge pieces
    for part in (True, False):  # each group in raster order of the tiles
        assert [r for r, w_ in zip(runs, whole) if w_ == part] == sorted(r for r, w_ in zip(runs, whole) if w_ == part)
    volume = tile[0] * tile[1] * tile[2]
    assert all(start % volume == 0 for start, w_ in zip(starts, whole) if w_)  # whole tiles stay block-aligned
    if tile == (1, 1, 1):
        assert torch.equal(order, torch.arange(order.numel()))


def test_divisible_grid_is_the_reshape_of_the_tiles():
    frames, rows, cols, (tf, th, tw) = 4, 8, 12, (2, 4, 4)
    idx = torch.arange(frames * rows * cols).view(frames // tf, tf, rows // th, th, cols // tw, tw)
    assert torch.equal(tile_permutation((frames, rows, cols), (tf, th, tw)),
                       idx.permute(0, 2, 4, 1, 3, 5).reshape(-1))


def test_order_and_inverse():
    order = TokenOrder((2, 4, 4))
    order.set_grid(GRID, torch.device("cpu"))
    x = torch.randn(3, 198, 5)
    tiled = order.to_tiles(x, 1)
    assert not torch.equal(tiled, x)
    assert torch.equal(order.to_raster(tiled, 1), x)
    with pytest.raises(slaconv.errors.InputError, match="197 tokens"):
        order.to_tiles(x[:, :197], 1)


def _inputs(per_token_timestep=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(1, 198, generator=g) * 1000 if per_token_timestep else torch.tensor([321.0])
    return dict(hidden_states=torch.randn(*LATENTS, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(1, 6, 16, generator=g), return_dict=False)


@pytest.mark.parametrize("per_token_timestep", [False, True])
def test_dense_mode_computes_what_the_original_does(per_token_timestep):
    original, tiled = make_wan(), make_wan()
    slaconv.sla2_(tiled, SLA2Config(topk=0.4, block_q=64, block_k=64, quant="none", token_tile=(2, 4, 4)))
    set_mode(tiled, "dense")
    with torch.no_grad():
        want = original(**_inputs(per_token_timestep))[0]
        got = tiled(**_inputs(per_token_timestep))[0]
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_sparse_layers_see_the_tokens_in_tile_order():
    seen = {}
    models = {}
    for name, tile in (("raster", None), ("tiles", (2, 4, 4))):
        model = make_wan()
        slaconv.sla2_(model, SLA2Config(topk=0.4, block_q=64, block_k=64, quant="none", token_tile=tile))
        proc = sla2_processors(model)["blocks.0.attn1"]

        def observe(proc, q, k, v, name=name):
            seen.setdefault(name, (q.clone(), k.clone()))  # returns None: the layer then runs as usual

        proc.observer = observe
        models[name] = model
        with torch.no_grad():
            model(**_inputs())
    order = tile_permutation(GRID, (2, 4, 4))
    for raster, tiled in zip(seen["raster"], seen["tiles"]):  # (B, N, H, D)
        assert torch.allclose(tiled, raster[:, order], atol=1e-6)
    with torch.no_grad():  # and the order changes which keys are selected, so the SLA2 outputs differ
        outs = [models[n](**_inputs())[0] for n in ("raster", "tiles")]
    assert not torch.allclose(*outs, atol=1e-4)


def test_setting_and_format_version():
    assert Recipe().override({"sla2.token_tile": [4, 4, 4]}).sla2.attention_config().token_tile == (4, 4, 4)
    assert Recipe().override({"sla2.token_tile": "4x2x8"}).sla2.token_tile == (4, 2, 8)
    assert "token_tile" not in Recipe().dump()
    with pytest.raises(RecipeError, match="three positive integers"):
        Recipe().override({"sla2.token_tile": [4, 4]})
    config = SLA2Config(token_tile=(4, 4, 4))
    assert config.format_version == 2 and config.to_dict()["token_tile"] == [4, 4, 4]
    assert SLA2Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SLA2Config().format_version == 1 and "token_tile" not in SLA2Config().to_dict()
    assert parse_tile("4x2x8") == (4, 2, 8)
    for bad in ("4x4", "0x4x4", "axbxc", "4x4x4x4"):
        with pytest.raises(RecipeError, match="FRAMESxROWSxCOLUMNS"):
            parse_tile(bad)


def test_family_without_token_order_is_refused_before_anything_changes():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4))
    with pytest.raises(RecipeError, match="flux family keeps its tokens in raster order"):
        slaconv.sla2_(model, SLA2Config(token_tile=(1, 4, 4)))
    assert not sla2_processors(model)


def test_work_dir_with_tiles_converts_inspects_and_loads(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage2.steps": 0})
    dry = run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--token-tile", "2x4x4", "--dry-run")
    assert "token order tiles of 2x4x4" in dry.stdout
    run("convert", tiny_wan_dir, "-o", work, "--recipe", recipe, "--token-tile", "2x4x4", "--quant", "none")
    saved = json.loads((work / "sla2_config.json").read_text())
    assert saved["token_tile"] == [2, 4, 4] and saved["format_version"] == 2
    assert "token order tiles of 2x4x4" in run("inspect", work).stdout
    model = slaconv.from_pretrained(work)
    ref = make_wan()
    slaconv.sla2_(ref, WorkDir(work).read_sla2_config().attention)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**_inputs())[0], ref(**_inputs())[0])
    fails(2, "convert", tiny_wan_dir, "-o", tmp_path / "w2", "--token-tile", "4x4", match="FRAMESxROWSxCOLUMNS")
    assert not (tmp_path / "w2").exists()
