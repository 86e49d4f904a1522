"""The shipped recipes load, hash stably, carry the paper's settings; bad recipes are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from slaconv.config import SLA2Config
from slaconv.errors import InputError, RecipeError
from slaconv.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))
WAN_FILES = sorted(RECIPES.glob("wan*.yaml"))
REQUIRED = ["wan2.1-t2v-1.3b-480p", "wan2.1-t2v-14b-720p", "wan2.2-t2v-a14b-720p"]


def test_required_recipes_exist():
    names = {f.stem for f in FILES}
    assert set(REQUIRED) <= names, sorted(names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_recipe_loads_and_hashes_stably(path: Path, tmp_path: Path):
    r = load_recipe(path)
    assert r.name == path.stem
    h = r.hash()
    assert h == load_recipe(path).hash()
    # The saved resolved recipe reloads to the same hash (what a resumed run relies on).
    r.save(tmp_path / "resolved.yaml")
    assert load_recipe(tmp_path / "resolved.yaml").hash() == h
    # A CLI-style override changes the hash.
    assert load_recipe(path, {"sla2.topk": "0.07"}).hash() != h  # a top-k no recipe uses
    # Every shipped recipe takes the linear branch over all key blocks (measured equal quality, faster forward);
    # the setting's own default stays the paper's form, which work dirs written without it mean.
    assert r.sla2.linear_keys == "all"
    assert "linear_keys: all" in (tmp_path / "resolved.yaml").read_text()


@pytest.mark.parametrize("path", WAN_FILES, ids=lambda p: p.stem)
def test_recipe_paper_settings_and_types(path: Path):
    r = load_recipe(path)
    s, c, v = r.sla2, r.calibration, r.validation
    assert (s.block_q, s.block_k, s.topk, s.quant) == (128, 64, 0.03, "int8-fp8")
    assert s.targets == () and r.model.family == "wan"
    assert c.stage1.tau == 0.1 and c.stage2.steps == 500
    st2 = c.stage2
    assert st2.lr == 1e-5 and st2.weight_decay == 0.01 and st2.gradient_checkpointing is True
    assert r.data.text_len == 512
    # A YAML "1e-5" (no dot) would load as a string: every number must really be one.
    numbers = [st2.weight_decay, st2.grad_clip, st2.timestep_shift, v.timestep_shift,
               c.stage1.lr, *v.gates.to_dict().values()]
    assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers), numbers
    assert isinstance(st2.warmup_steps, int) and st2.warmup_steps < st2.steps
    assert st2.timestep_shift == v.timestep_shift


# The other families' recipes: (family, latent channels and patch (t, h, w) of the published model, the
# pipeline's text length)
OTHER_FAMILIES = {
    "flux.1-dev-1024px": ("flux", 16, (1, 2, 2), 512),
    "hunyuanvideo-720p": ("hunyuan_video", 16, (1, 2, 2), 256),
    "cogvideox-5b-720x480": ("cogvideox", 16, (1, 2, 2), 226),
    "ltx-video-0.9-704x512": ("ltx_video", 128, (1, 1, 1), 128),
}


def test_every_recipe_is_a_wan_or_a_listed_family():
    assert {f.stem for f in FILES} == {f.stem for f in WAN_FILES} | set(OTHER_FAMILIES)


@pytest.mark.parametrize("name", sorted(OTHER_FAMILIES))
def test_other_family_recipes(name: str):
    """Their family is registered, the data resolution tiles the model's patches, the text length is the
    pipeline's, and the settings taken from the paper are the paper's."""
    from slaconv.families import get_family

    family, channels, patch, text_len = OTHER_FAMILIES[name]
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert get_family(r.model.family).name == family and r.model.dtype == "bfloat16"
    d = r.data
    assert all(size % p == 0 for size, p in zip((d.frames, d.height, d.width), patch)) and d.text_len == text_len
    s, st2 = r.sla2, r.calibration.stage2
    assert (s.block_q, s.block_k, s.quant, s.targets) == (128, 64, "int8-fp8", ())
    assert r.calibration.stage1.tau == 0.1 and st2.steps == 500 and st2.timestep_shift == r.validation.timestep_shift
    assert all(isinstance(x, (int, float)) and not isinstance(x, bool)
               for x in (st2.lr, st2.weight_decay, st2.grad_clip, st2.timestep_shift, s.topk))
    import torch

    fam = get_family(family)
    with torch.device("meta"):  # the published architecture is the class's default configuration
        config = dict(fam.load_class()().config)
    assert fam.latent_channels(config) == channels and fam.patch_size(config) == patch


def _batch(r) -> int:
    st2 = r.calibration.stage2
    return st2.batch_size * st2.grad_accum


def test_model_specific_values():
    r13 = load_recipe(RECIPES / "wan2.1-t2v-1.3b-480p.yaml")
    assert _batch(r13) == 64
    assert [r13.data.frames, r13.data.height, r13.data.width] == [21, 60, 104]
    r14 = load_recipe(RECIPES / "wan2.1-t2v-14b-720p.yaml")
    assert _batch(r14) == 15
    assert [r14.data.frames, r14.data.height, r14.data.width] == [21, 90, 160]
    for f in RECIPES.glob("wan2.2-t2v-a14b-720p*.yaml"):
        r = load_recipe(f)
        assert _batch(r) == 15 and r.data == r14.data
    hi = load_recipe(RECIPES / "wan2.2-t2v-a14b-720p.yaml").validation.timesteps
    assert min(hi) >= 875  # the high-noise expert only sees t >= boundary
    lo_path = RECIPES / "wan2.2-t2v-a14b-720p-transformer_2.yaml"
    if lo_path.exists():
        assert max(load_recipe(lo_path).validation.timesteps) < 875


def test_recipe_hashes_differ():
    hashes = [load_recipe(f).hash() for f in FILES]
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
    ({"sla2": {"feature_map": "cosine"}}, "sla2.feature_map must be one of"),
    ({"calibration": {"stage1": {"feature_lr": -1.0}}}, "calibration.stage1.feature_lr must be >= 0"),
    ({"calibration": {"stage2": {"objective": "mse"}}}, "objective must be one of"),
    ({"calibration": {"stage2": {"lr_schedule": "linear"}}}, "calibration.stage2.lr_schedule must be one of"),
    ({"calibration": {"stage2": {"lr": "1e-5"}}}, "stage2.lr must be > 0"),  # YAML string, not a float
    ({"data": {"height": 0}}, "data.height must be a positive integer"),
    ({"sla2": "dense"}, "'sla2' must be a mapping"),
    ({"sla2": {"topk_per_layer": {"blocks.0.attn1": 2}}}, r"sla2.topk_per_layer\['blocks.0.attn1'\] must be in \(0, 1\]"),
    ({"sla2": {"topk_per_layer": 0.1}}, "sla2.topk_per_layer must be a mapping"),
    ({"sla2": {"alpha_init": 1.0}}, r"sla2.alpha_init must be 'calibrate' or in \(0, 1\)"),
    ({"sla2": {"targets": "blocks.0.attn1"}}, "sla2.targets must be a list of strings"),
    ({"validation": {"gates": {"psnr": 3}}}, "unknown recipe key 'validation.gates.psnr'"),
    ({"validation": {"gates": {"sample_psnr_min_db": "high"}}}, "validation.gates.sample_psnr_min_db must be a number"),
    ({"calibration": {"stage1": {"steps": True}}}, "calibration.stage1.steps must be an integer >= 0"),
    ({"calibration": {"stage2": {"teacher": "offline"}}}, "calibration.stage2.teacher must be 'online' or 'precompute'"),
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


# A recipe.yaml as the dict-based recipe module of slaconv 0.1.0 resolved and saved it, with the hash that
# such a work dir's sla2_config.json records: it must keep loading to the same values and hash.
RESOLVED_BEFORE = """name: default
model:
  family: auto
  dtype: bfloat16
sla2:
  targets: []
  ignore: []
  topk: 0.4
  topk_per_layer:
    blocks.0.attn1: 0.25
  block_q: 64
  block_k: 64
  quant: int8-fp8
  alpha_init: calibrate
data:
  frames: 2
  height: 16
  width: 16
  text_len: 12
calibration:
  seed: 0
  checkpoint_every: 50
  checkpoints_total_limit: 2
  eval_samples: 2
  stage1:
    steps: 100
    lr: 0.0001
    alpha_lr: 0.05
    tau: 0.1
    batch_size: 1
    query_blocks_per_step: 8
  stage2:
    steps: 50
    lr: 1.0e-05
    weight_decay: 0.01
    warmup_steps: 5
    grad_clip: 1.0
    batch_size: 1
    grad_accum: 1
    objective: distill
    quant: none
    gradient_checkpointing: false
    timestep_shift: 5.0
    train_alpha: true
    teacher: online
validation:
  seed: 1234
  num_samples: 2
  timesteps:
  - 700
  - 200
  sample_steps: 4
  timestep_shift: 5.0
  gates:
    attention_rel_l2_max: 1.0
    velocity_rel_l2_max: 1.0
    sample_psnr_min_db: 0.0
"""


def test_recipe_yaml_of_earlier_work_dirs_loads_unchanged(tmp_path: Path):
    """Every value an earlier resolved recipe holds loads as it was; the one gate added since (the velocity
    error against the convert-only baseline) takes its default, which the dump and the hash then include."""
    assert Recipe().hash() == "37a43ecd6d54aa3d"
    (tmp_path / "recipe.yaml").write_text(RESOLVED_BEFORE)
    r = load_recipe(tmp_path / "recipe.yaml")
    assert r.hash() == "c83006cf40f3ac0b"
    assert r.dump() == RESOLVED_BEFORE + "    velocity_vs_convert_only_max: 1.1\n"
    assert r == Recipe().override({"sla2.topk": 0.4, "sla2.block_q": 64, "model.dtype": "bfloat16",
                                   "sla2.topk_per_layer": {"blocks.0.attn1": 0.25},
                                   "calibration.stage2.quant": "none", "validation.timesteps": "[700, 200]",
                                   "validation.gates": {"attention_rel_l2_max": 1.0, "velocity_rel_l2_max": 1.0,
                                                        "sample_psnr_min_db": 0.0}})


def test_keys_added_later_are_written_only_when_set(tmp_path: Path):
    """calibration.divergence_factor and heldout_tolerance came after recipes were first saved: at their
    defaults they stay out of the resolved recipe (its hash with them); set, they are written and read back."""
    assert "divergence_factor" not in Recipe().dump() and "heldout_tolerance" not in Recipe().dump()
    r = Recipe().override({"calibration.divergence_factor": 3.0, "calibration.heldout_tolerance": 0.1})
    assert r.hash() != Recipe().hash()
    r.save(tmp_path / "r.yaml")
    back = load_recipe(tmp_path / "r.yaml")
    assert back == r and back.calibration.divergence_factor == 3.0 and back.calibration.heldout_tolerance == 0.1
    for key, value in (("sla2.feature_map", "hedgehog"), ("calibration.stage1.feature_lr", 0.1),
                       ("calibration.stage2.lr_schedule", "cosine")):
        assert key.rsplit(".", 1)[1] not in Recipe().dump()
        changed = Recipe().override({key: value})
        assert changed.hash() != Recipe().hash()
        changed.save(tmp_path / "r.yaml")
        assert load_recipe(tmp_path / "r.yaml") == changed
    # the whole schema, for tools that filter recipes against it, lists them at their defaults too
    every = Recipe().to_dict(every_key=True)
    assert every["calibration"]["stage2"]["lr_schedule"] == "constant" and every["sla2"]["feature_map"] == "softmax"
    assert every["calibration"]["divergence_factor"] == 2.0


def test_stage1_with_only_the_feature_rate_trains_a_hedgehog_map_only():
    frozen = {"calibration.stage1.lr": 0.0, "calibration.stage1.alpha_lr": 0.0}
    r = Recipe().override({"sla2.feature_map": "hedgehog", **frozen})
    assert r.sla2.attention_config().feature_map == "hedgehog"
    with pytest.raises(RecipeError, match="nothing to train"):
        Recipe().override(frozen)
    with pytest.raises(RecipeError, match="nothing to train"):
        r.override({"calibration.stage1.feature_lr": 0.0})


def test_sla2_section_builds_the_attention_config():
    r = load_recipe(None, {"sla2.topk": "0.1", "sla2.block_q": 64, "sla2.quant": "none",
                           "sla2.topk_per_layer": {"blocks.1.attn1": 0.2}})
    config = r.sla2.attention_config()
    assert config == SLA2Config(topk=0.1, block_q=64, block_k=64, quant="none", topk_per_layer={"blocks.1.attn1": 0.2})
    assert config.topk_for("blocks.1.attn1") == 0.2 and config.topk_for("blocks.0.attn1") == 0.1


def test_recipes_are_immutable_and_overrides_return_checked_copies():
    r = Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sla2.topk = 0.5  # type: ignore[misc]
    changed = r.override({"calibration.seed": 7, "calibration.stage2.lr": "2.0e-5", "sla2.topk": None})
    assert (changed.calibration.seed, changed.calibration.stage2.lr, changed.sla2.topk) == (7, 2e-5, 0.05)
    assert r.calibration.seed == 0 and changed.calibration.stage1 == r.calibration.stage1
    with pytest.raises(RecipeError, match="calibration.stage2.lr must be > 0"):
        r.override({"calibration.stage2.lr": 0})
    with pytest.raises(RecipeError, match="unknown recipe key 'calibration.stage3'"):
        r.override({"calibration.stage3.steps": 1})
