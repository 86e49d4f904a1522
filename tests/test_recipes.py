"""The shipped recipes load, hash stably, carry the paper's settings; bad recipes are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slaconv.errors import InputError, RecipeError
from slaconv.recipe import load_recipe, recipe_hash, save_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))
REQUIRED = ["wan2.1-t2v-1.3b-480p", "wan2.1-t2v-14b-720p", "wan2.2-t2v-a14b-720p"]


def test_required_recipes_exist():
    names = {f.stem for f in FILES}
    assert set(REQUIRED) <= names, sorted(names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_recipe_loads_and_hashes_stably(path: Path, tmp_path: Path):
    r = load_recipe(path)
    assert r["name"] == path.stem
    h = recipe_hash(r)
    assert h == recipe_hash(load_recipe(path))
    # The saved resolved recipe reloads to the same hash (what a resumed run relies on).
    save_recipe(r, tmp_path / "resolved.yaml")
    assert recipe_hash(load_recipe(tmp_path / "resolved.yaml")) == h
    # A CLI-style override changes the hash.
    assert recipe_hash(load_recipe(path, {"sla2.topk": "0.05"})) != h


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_recipe_paper_settings_and_types(path: Path):
    r = load_recipe(path)
    s, c, v = r["sla2"], r["calibration"], r["validation"]
    assert (s["block_q"], s["block_k"], s["topk"], s["quant"]) == (128, 64, 0.03, "int8-fp8")
    assert s["targets"] == [] and r["model"]["family"] == "wan"
    assert c["stage1"]["tau"] == 0.1 and c["stage2"]["steps"] == 500
    st2 = c["stage2"]
    assert st2["lr"] == 1e-5 and st2["weight_decay"] == 0.01 and st2["gradient_checkpointing"] is True
    assert r["data"]["text_len"] == 512
    # Fields recipe.validate() does not type-check: a YAML "1e-5" (no dot) would load as a string.
    numbers = [st2["weight_decay"], st2["grad_clip"], st2["timestep_shift"], v["timestep_shift"],
               c["stage1"]["lr"], *v["gates"].values()]
    assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers), numbers
    assert isinstance(st2["warmup_steps"], int) and st2["warmup_steps"] < st2["steps"]
    assert st2["timestep_shift"] == v["timestep_shift"]


def _batch(r: dict) -> int:
    st2 = r["calibration"]["stage2"]
    return st2["batch_size"] * st2["grad_accum"]


def test_model_specific_values():
    r13 = load_recipe(RECIPES / "wan2.1-t2v-1.3b-480p.yaml")
    assert _batch(r13) == 64
    assert [r13["data"][k] for k in ("frames", "height", "width")] == [21, 60, 104]
    r14 = load_recipe(RECIPES / "wan2.1-t2v-14b-720p.yaml")
    assert _batch(r14) == 15
    assert [r14["data"][k] for k in ("frames", "height", "width")] == [21, 90, 160]
    for f in RECIPES.glob("wan2.2-t2v-a14b-720p*.yaml"):
        r = load_recipe(f)
        assert _batch(r) == 15 and r["data"] == r14["data"]
    hi = load_recipe(RECIPES / "wan2.2-t2v-a14b-720p.yaml")["validation"]["timesteps"]
    assert min(hi) >= 875  # the high-noise expert only sees t >= boundary
    lo_path = RECIPES / "wan2.2-t2v-a14b-720p-transformer_2.yaml"
    if lo_path.exists():
        assert max(load_recipe(lo_path)["validation"]["timesteps"]) < 875


def test_recipe_hashes_differ():
    hashes = [recipe_hash(load_recipe(f)) for f in FILES]
    assert len(set(hashes)) == len(hashes)


BASE = RECIPES / "wan2.1-t2v-1.3b-480p.yaml"


def _variant(tmp_path: Path, patch: dict) -> Path:
    """The 1.3B recipe with ``patch`` merged in (nested dicts)."""
    data = yaml.safe_load(BASE.read_text())

    def merge(dst: dict, src: dict) -> None:
        for k, val in src.items():
            if isinstance(val, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], val)
            else:
                dst[k] = val

    merge(data, patch)
    out = tmp_path / "bad.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("patch, match", [
    ({"sla2": {"topk_ratio": 0.05}}, "unknown recipe key 'sla2.topk_ratio'"),
    ({"training": {"steps": 1}}, "unknown recipe key 'training'"),
    ({"calibration": {"stage2": {"learning_rate": 1e-5}}}, "unknown recipe key 'calibration.stage2.learning_rate'"),
    ({"sla2": {"topk": 0}}, "sla2.topk must be in"),
    ({"sla2": {"topk": 1.5}}, "sla2.topk must be in"),
    ({"sla2": {"block_q": 96}}, "sla2.block_q must be one of"),
    ({"sla2": {"block_k": 32}}, "sla2.block_k must be one of"),
    ({"sla2": {"quant": "fp4"}}, "sla2.quant must be one of"),
    ({"calibration": {"stage2": {"objective": "mse"}}}, "objective must be one of"),
    ({"calibration": {"stage2": {"lr": "1e-5"}}}, "stage2.lr must be > 0"),  # YAML string, not a float
    ({"data": {"height": 0}}, "data.height must be a positive integer"),
    ({"sla2": "dense"}, "'sla2' must be a mapping"),
])
def test_bad_recipes(tmp_path: Path, patch: dict, match: str):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_variant(tmp_path, patch))


def test_bad_overrides_and_files(tmp_path: Path):
    with pytest.raises(RecipeError, match="sla2.topk must be in"):
        load_recipe(BASE, {"sla2.topk": "0"})
    with pytest.raises(RecipeError, match="unknown recipe key"):
        load_recipe(BASE, {"sla2.nope": "1"})
    bad = tmp_path / "broken.yaml"
    bad.write_text("sla2: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping at the top level"):
        load_recipe(bad)
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
