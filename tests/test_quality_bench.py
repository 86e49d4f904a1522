"""The quality benchmark (slaconv.quality) on the CPU at smoke size.

Generator determinism, a classifier that learns above chance, a DiT trained for a few steps, and the
table driver running every row through the real slaconv CLI at tiny size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slaconv.errors import InputError, UsageError
from slaconv.kernels import reference
from slaconv.quality import common, metrics
from slaconv.quality import synthvideo as sv
from slaconv.quality.render import render
from slaconv.recipe import load_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    # The smoke sizes are tiny: one thread is as fast as two and immune to oversubscription on a busy CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_generator_is_deterministic_and_class_dependent():
    spec = sv.SMOKE_SPEC
    a, la = sv.generate(7, [0, 1, 5], spec)
    b, lb = sv.generate(7, [5, 0, 1], spec)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and torch.equal(la[[0, 2]], lb[[1, 0]])
    assert a.shape == (3, spec.channels, spec.frames, spec.size, spec.size)
    assert a.min() >= -1 and a.max() <= 1
    c, _ = sv.generate(8, [0], spec)
    assert not torch.equal(a[0], c[0])  # another stream, another video
    # Same sample (same motion, colours, background), two classes: only the glyph differs.
    x0, _ = sv.generate(3, [4], spec, labels=[0])
    x1, _ = sv.generate(3, [4], spec, labels=[1])
    mask0, mask1 = x0[0, 3], x1[0, 3]  # object-mask channel
    assert (mask0 - mask1).abs().mean() > 0.05
    # Class embeddings are fixed and distinct.
    e = sv.class_embeddings(spec)
    assert e.shape == (spec.num_classes, spec.text_len, spec.text_dim)
    assert torch.equal(e, sv.class_embeddings(spec)) and not torch.allclose(e[0], e[1])
    # Full-size videos give >= 8,192 tokens after Wan's (1, 2, 2) patch.
    assert sv.VideoSpec().tokens() >= 8192


def test_render_matches_per_object_compositing():
    """The batched renderer (objects padded to the batch maximum) draws each sample exactly as if alone."""
    spec = sv.VideoSpec(frames=3, size=32, glyph_res=32)
    params = [sv.sample_params(5, i, spec) for i in range(6)]
    assert len({len(p.motion) for p in params}) > 1  # the batch mixes object counts, so padding is exercised
    batch = render(params, spec)
    for i, p in enumerate(params):
        assert torch.equal(batch[i], render([p], spec)[0])


def test_texture_moves_with_the_content_and_leaves_flat_streams_alone():
    """texture > 0: every sample still renders exactly as if alone; the same random choices as the flat spec
    (texture is drawn last), so the texture is the only difference; it adds fine detail (the difference
    between neighbouring background pixels grows); and the background texture pans (frame 2's differs from
    frame 0's)."""
    flat = sv.VideoSpec(frames=3, size=32, glyph_res=32)
    tex = sv.VideoSpec(frames=3, size=32, glyph_res=32, texture=0.15, texture_cells=8)
    params = [sv.sample_params(7, i, tex) for i in range(5)]
    batch = render(params, tex)
    for i, p in enumerate(params):
        assert torch.equal(batch[i], render([p], tex)[0])
    flat_params = [sv.sample_params(7, i, flat) for i in range(5)]
    for p, q in zip(params, flat_params):
        assert torch.equal(p.cx, q.cx) and torch.equal(p.color, q.color) and q.texture is None
        assert p.texture is not None and p.texture.shape == (len(p.motion), 1, 4, 4)
    flat_batch = render(flat_params, flat)
    assert not torch.equal(flat_batch, batch)
    mask = flat_batch[:, 3:4] < -0.99  # background pixels (object mask channel at -1)

    def detail(v):
        return ((v[:, :3, :, :, 1:] - v[:, :3, :, :, :-1]).abs() * mask[..., 1:]).sum() / mask[..., 1:].sum()

    assert detail(batch) > 1.4 * detail(flat_batch), (detail(batch), detail(flat_batch))
    added = (batch - flat_batch)[:, :3] * mask  # the background texture alone
    assert (added[:, :, 2] - added[:, :, 0]).abs().mean() > 0.2 * added[:, :, 0].abs().mean()  # it pans


def test_null_rounds_keep_classes_balanced(tmp_path):
    spec = sv.SMOKE_SPEC  # 4 classes
    nulls = sv.null_rounds(16, spec, 2)
    assert nulls == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    assert sv.null_rounds(8, spec, 0) == [False] * 8
    from slaconv.data import CalibrationDataset

    sv.write_slaconv_dataset(tmp_path / "d", 2, 8, spec, null_every=2)
    ds = CalibrationDataset(tmp_path / "d", expected_channels=spec.channels, expected_text_dim=spec.text_dim)
    assert torch.equal(ds[5]["prompt_embeds"], sv.null_embedding(spec))
    assert torch.equal(ds[1]["prompt_embeds"], sv.class_embeddings(spec)[1])


class _EchoModel(torch.nn.Module):
    """A stand-in DiT whose velocity is x times the mean of its conditioning (so conditioning matters)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        return (hidden_states * (1 + encoder_hidden_states.mean(dim=(1, 2))).view(-1, 1, 1, 1, 1),)


def test_guided_velocity_is_classifier_free_guidance():
    x, s = torch.randn(3, 4, 2, 8, 8), torch.rand(3)
    emb, null = torch.randn(3, 4, 32), torch.zeros(4, 32)
    m = _EchoModel()
    v_c, v_n = common.velocity(m, x, s, emb), common.velocity(m, x, s, null.expand_as(emb))
    assert torch.allclose(common.guided_velocity(m, x, s, emb, null, 4.0), v_n + 4.0 * (v_c - v_n), atol=1e-6)
    assert torch.equal(common.guided_velocity(m, x, s, emb, None, 1.0), v_c)
    with pytest.raises(ValueError):
        common.guided_velocity(m, x, s, emb, None, 3.0)


def test_schedule_follows_the_wall_time_budget():
    from slaconv.quality import train_dit

    assert train_dit.progress_at(50, 100, 10.0, None) == 0.5
    assert train_dit.progress_at(50, 100, 90.0, 100.0) == 0.9  # time runs out before the steps do
    assert train_dit.progress_at(99, 100, 1.0, 100.0) == 0.99
    assert train_dit.lr_at(200, 1.0, 1e-3, 10) == pytest.approx(1e-4)
    assert train_dit.lr_at(4, 0.0, 1e-3, 10) == pytest.approx(5e-4)


def test_table_refuses_mismatched_inputs(tmp_path):
    """Explicit guidance on a model without conditioning dropout (the default falls back to unguided), or a
    judge of other videos, stop the table at once."""
    from slaconv.quality import table as quality_table

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"in_channels": 4, "text_dim": 32}))
    summary = {"spec": sv.VideoSpec().to_dict(), "settings": {}}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    with pytest.raises(UsageError, match="--guidance 1"):
        quality_table.run(tmp_path / "model", tmp_path / "q", device="cpu", log=lambda *_: None,
                        settings_override={"guidance": 5.0})
    summary["settings"]["cond_dropout"] = 0.1
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    metrics.save_classifier(metrics.FrameClassifier(), tmp_path / "clf", {"summary": {"spec": sv.SMOKE_SPEC.to_dict()}})
    with pytest.raises(InputError, match="other videos"):
        quality_table.run(tmp_path / "model", tmp_path / "q", classifier_dir=tmp_path / "clf", device="cpu",
                        log=lambda *_: None)


def test_frame_accuracy_standard_error_is_over_videos():
    """Two videos, 4 frames: one all right, one half right -> accuracy 0.75, s.e. = std([1, .5]) / sqrt(2)."""
    pred = torch.tensor([[3, 3, 3, 3], [1, 2, 1, 2]])
    acc, se = metrics.frame_accuracy(pred, torch.tensor([3, 1]))
    assert acc == 0.75 and abs(se - 0.25) < 1e-6
    # the same frames spread so every video is at 0.75: no spread between videos, no error
    acc, se = metrics.frame_accuracy(torch.tensor([[3, 3, 3, 0], [1, 1, 0, 1]]), torch.tensor([3, 1]))
    assert acc == 0.75 and se == 0.0
    assert metrics.frame_accuracy(torch.tensor([[2, 2]]), torch.tensor([2])) == (1.0, 0.0)


def test_calibration_noise_shift_is_its_own_setting(tmp_path):
    """--calib-shift changes only the calibration noise levels (the recipe's calibration.stage2.timestep_shift);
    sampling and validate keep theirs.  --stage2-lr-schedule reaches the recipe too."""
    import copy

    import yaml

    from slaconv.quality import table as quality_table
    from slaconv.quality.table_settings import SMOKE_SETTINGS

    settings = copy.deepcopy(SMOKE_SETTINGS)
    default = yaml.safe_load(quality_table.write_recipe(tmp_path / "a.yaml", settings, sv.SMOKE_SPEC,
                                                        topk=0.5).read_text())
    settings["stage2"]["timestep_shift"] = 1.0
    shifted = yaml.safe_load(quality_table.write_recipe(tmp_path / "b.yaml", settings, sv.SMOKE_SPEC,
                                                        topk=0.5).read_text())
    assert default["calibration"]["stage2"]["timestep_shift"] == settings["timestep_shift"] != 1.0
    assert shifted["calibration"]["stage2"]["timestep_shift"] == 1.0
    assert (shifted["validation"]["timestep_shift"] == default["validation"]["timestep_shift"]
            == settings["timestep_shift"])
    # a key a recipe leaves out at its default: the table writes it, and what it asks for
    settings["stage2"]["lr_schedule"] = "cosine"
    cosine = yaml.safe_load(quality_table.write_recipe(tmp_path / "c.yaml", settings, sv.SMOKE_SPEC,
                                                       topk=0.5).read_text())
    assert default["calibration"]["stage2"]["lr_schedule"] == "constant"
    assert cosine["calibration"]["stage2"]["lr_schedule"] == "cosine"
    assert load_recipe(tmp_path / "c.yaml").calibration.stage2.lr_schedule == "cosine"


def test_design_choices_reach_every_converted_row_and_bad_ones_stop_the_table(tmp_path):
    """--sla2 feature_map=hedgehog lands in the recipe of every row; a value the schema does not know, or a
    key that is not a design choice, stops the table before any row with the reason."""
    import yaml

    from slaconv.quality import table as quality_table
    from slaconv.quality.table_settings import table_settings

    args = quality_table.argparse.Namespace(**{k: None for k in (
        "topk", "stage1_steps", "stage1_lr", "stage2_steps", "stage2_batch_size", "stage2_lr", "calib_shift",
        "stage2_lr_schedule",
        "block_q", "guidance", "rows", "frames", "heldout_samples", "sample_steps", "sample_per_class",
        "calib_samples")}, sla2=["feature_map=hedgehog", "mixing = query"])
    over = quality_table.settings_from_args(args)
    assert over["sla2"] == {"feature_map": "hedgehog", "mixing": "query"}
    settings = table_settings(True, over)
    recipe = yaml.safe_load(quality_table.write_recipe(tmp_path / "r.yaml", settings, sv.SMOKE_SPEC,
                                                       topk=0.05).read_text())
    assert recipe["sla2"]["feature_map"] == "hedgehog" and recipe["sla2"]["mixing"] == "query"
    assert recipe["sla2"]["topk"] == 0.05
    quality_table.check_sla2_choices(tmp_path / "ok.yaml", settings, sv.SMOKE_SPEC)
    with pytest.raises(UsageError, match="--sla2: .*feature_map"):
        quality_table.check_sla2_choices(tmp_path / "bad.yaml", table_settings(True, {"sla2": {"feature_map": "cosine"}}),
                                         sv.SMOKE_SPEC)
    for bad in ("topk=0.5", "feature_map", "feature_map="):
        with pytest.raises(UsageError, match="--sla2"):
            quality_table.sla2_setting(bad)
    assert quality_table.sla2_setting("token_tile=4x4x4") == ("token_tile", "4x4x4")
    tiled = table_settings(True, {"sla2": {"token_tile": "4x4x4"}})
    quality_table.check_sla2_choices(tmp_path / "tiled.yaml", tiled, sv.SMOKE_SPEC)
    assert yaml.safe_load(quality_table.write_recipe(tmp_path / "t.yaml", tiled, sv.SMOKE_SPEC,
                                                     topk=0.05).read_text())["sla2"]["token_tile"] in ("4x4x4", [4, 4, 4])


def test_ssim_and_psnr():
    x = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert metrics.psnr(x, x) > 100
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert 0 < metrics.ssim(noisy, x) < 0.9
    assert metrics.psnr(noisy, x) < metrics.psnr((x + 0.05 * torch.randn_like(x)).clamp(-1, 1), x)


def test_slaconv_dataset_format(tmp_path):
    from slaconv.data import CalibrationDataset

    spec = sv.SMOKE_SPEC
    sv.write_slaconv_dataset(tmp_path / "data", 2, 5, spec)
    ds = CalibrationDataset(tmp_path / "data", expected_channels=spec.channels, expected_text_dim=spec.text_dim)
    assert len(ds) == 5 and ds.latent_shape == (spec.channels, spec.frames, spec.size, spec.size)
    item = ds[3]
    assert torch.equal(item["prompt_embeds"], sv.class_embeddings(spec)[3 % spec.num_classes])


def test_classifier_learns_above_chance(tmp_path):
    from slaconv.quality import train_classifier

    summary = train_classifier.train(tmp_path / "clf", smoke=True, lr=3e-3, device="cpu", log=lambda *_: None)
    chance = 1 / sv.SMOKE_SPEC.num_classes
    assert summary["heldout_clean"]["accuracy"] > chance + 0.15
    clf = metrics.load_classifier(tmp_path / "clf")
    x, y = sv.generate(common.HELDOUT_SEED, range(8), sv.SMOKE_SPEC)
    assert metrics.classifier_scores(clf, x, y)["accuracy"] >= 0


def test_smoke_pipeline_end_to_end(tmp_path):
    """Train the tiny DiT, then the table driver: every row through the real CLI."""
    from slaconv.quality import table as quality_table
    from slaconv.quality import train_classifier, train_dit

    quiet = lambda *_: None  # noqa: E731
    summary = train_dit.train(tmp_path / "dit", smoke=True, device="cpu", log=quiet)
    model_dir = tmp_path / "dit" / "model"
    assert (model_dir / "config.json").is_file() and summary["checkpoint_mb"] < 16
    assert (tmp_path / "dit" / "samples.png").is_file() and (tmp_path / "dit" / "loss_curve.png").is_file()
    log = [json.loads(line) for line in (tmp_path / "dit" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    clf = train_classifier.train(tmp_path / "clf", smoke=True, steps=10, device="cpu", score_model_dir=model_dir,
                                 log=quiet)
    by_g = clf["dit_samples"]["by_guidance"]
    assert set(by_g) == {"1", f"{common.SAMPLE_GUIDANCE:g}"} and all(0 <= v["accuracy"] <= 1 for v in by_g.values())

    res = quality_table.run(model_dir, tmp_path / "q", classifier_dir=tmp_path / "clf", smoke=True, validate="first",
                          device="cpu", log=quiet)
    assert res["settings"]["guidance"] == common.SAMPLE_GUIDANCE != 1.0  # every row sampled with guidance
    manifest = json.loads((tmp_path / "q" / "data" / "dataset.json").read_text())
    assert any(manifest["null_embedding"]) and not all(manifest["null_embedding"])
    names = {(r["group"], r["name"]) for r in res["rows"]}
    assert ("dense", "dense original") in names
    for tag in ("90%", "95%", "97%"):
        for row in ("SLA2, no fine-tuning (convert only)", "SLA2, stage 1 only", "SLA2 (stage 1 + stage 2 QAT)",
                    "w/o stage 1 (heuristic router), stage 2 QAT", "w/o QAT (bf16 fine-tune), evaluated int8-fp8",
                    "w/o QAT, evaluated bf16 (no low-bit)", "sparse only (alpha = 1), stage 1 + stage 2 QAT"):
            assert (f"sparsity {tag}", row) in names
    assert ("linear only", "linear only (alpha = 0), stage 2") in names
    assert len(res["rows"]) == 1 + 3 * 7 + 2
    for r in res["rows"]:
        assert r["heldout_fm_loss"] == r["heldout_fm_loss"]  # finite
        if r["group"] != "dense":
            assert r["psnr"] is not None and 0 < r["ssim"] <= 1
    by = {(r["group"], r["name"]): r for r in res["rows"]}
    # The ablations really are what they say.
    assert by[("sparsity 95%", "sparse only (alpha = 1), stage 1 + stage 2 QAT")]["alpha_min_mean_max"][0] > 0.999999
    assert by[("linear only", "linear only (alpha = 0), stage 2")]["alpha_min_mean_max"][2] < 1e-6
    assert all(c["exit_code"] in (0, 4) for c in res["cli_calls"])
    assert any(c["argv"][3] == "calibrate" and "--stage" in c["argv"] for c in res["cli_calls"])
    out = tmp_path / "q"
    table = (out / "results.md").read_text()
    assert table.count("\n| ") >= 1 + len(res["rows"]) and "sparse only" in table
    assert (out / "samples.png").is_file() and json.loads((out / "results.json").read_text())["rows"]
    assert not (out / "results.partial.json").exists()  # only a run cut short leaves it

    # `make demo-trained`'s shape: the main rows only, on single frames of the same model
    demo = quality_table.run(model_dir, tmp_path / "demo", classifier_dir=tmp_path / "clf", smoke=True, validate="none",
                           settings_override={"rows": "main", "frames": 1, "topks": [0.25]}, device="cpu", log=quiet)
    assert demo["spec"]["frames"] == 1 and demo["tokens_per_sample"] < res["tokens_per_sample"]
    assert [r["name"] for r in demo["rows"]] == ["dense original", "SLA2, no fine-tuning (convert only)",
                                                 "SLA2, stage 1 only", "SLA2 (stage 1 + stage 2 QAT)"]


def test_shipped_checkpoint_has_learned(tmp_path):
    """The shipped original (<= 16 MB, plain diffusers) predicts flow-matching velocities on fresh videos
    (a held-out seed never used in training) far better than an untrained model of the same architecture.

    The videos follow the spec recorded in the checkpoint's train_summary.json, so this holds for
    whichever checkpoint is shipped."""
    from diffusers import WanTransformer3DModel

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "checkpoint" / "model"
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mb <= 16
    trained = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    untrained = common.build_model(json.loads((folder / "config.json").read_text()), seed=0).float().eval()
    torch.set_num_threads(2)
    spec, _ = common.trained_spec(folder)
    assert spec.tokens() >= 8192
    hs = metrics.heldout_set(spec, 2, seed=9_001)  # full-size videos from an unseen stream
    loss_trained = metrics.heldout_fm_loss(trained, hs, "cpu", batch_size=1)["loss"]
    loss_untrained = metrics.heldout_fm_loss(untrained, hs, "cpu", batch_size=1)["loss"]
    print(f"held-out FM loss: trained {loss_trained:.4f}, untrained {loss_untrained:.4f}")
    assert loss_trained < 0.5 * loss_untrained, (loss_trained, loss_untrained)
    reported = json.loads((folder.parent / "train_summary.json").read_text())["heldout_fm_loss"]["loss"]
    assert loss_trained < 2.5 * reported, (loss_trained, reported)  # 2 videos vs its own 64-video held-out figure


def test_attention_mass_capture_and_block_pooling():
    """attention_stats: the captured self-attention Q/K reproduce the layer's attention output, block mass
    rows sum to 1, the oracle holds at least what the heuristic router's blocks hold, and the counts are
    consistent (more blocks, more mass; the blocks needed for 90% exceed the 97% budget when it holds less)."""
    from slaconv.quality import attention_stats as am

    spec = sv.SMOKE_SPEC
    model = common.build_model({**common.MODEL_CONFIG, "num_layers": 2}, seed=3).eval()
    hs = metrics.heldout_set(spec, 2, sigmas=(0.5,))
    n = spec.tokens(tuple(model.config.patch_size))
    layers = am.capture_qk(model, hs, n)
    assert len(layers) == 2 and layers[0][0].shape[-2] == n
    # the captured (q, k) are what the layer attended with: its attn1 output from them matches SDPA's
    from diffusers.models.transformers import transformer_wan as tw

    outs = []
    original = tw.dispatch_attention_fn

    def keep(query, key, value, *a, **kw):
        out = original(query, key, value, *a, **kw)
        if key.shape[1] == n:
            outs.append((value.detach().float().transpose(1, 2), out.detach().float()))
        return out

    tw.dispatch_attention_fn = keep
    try:
        with torch.no_grad():
            s = hs["sigma"].view(-1, 1, 1, 1, 1)
            common.velocity(model, (1 - s) * hs["x0"] + s * hs["noise"], hs["sigma"], hs["emb"])
    finally:
        tw.dispatch_attention_fn = original
    q, k = layers[1]
    v, out = outs[1]
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close((p @ v).transpose(1, 2), out, rtol=1e-4, atol=1e-5)

    block_q = block_k = 32 if n % 64 else 64
    mass = am.block_mass(q[0, 0], k[0, 0], block_q, block_k)
    torch.testing.assert_close(mass.sum(dim=-1), torch.ones(mass.shape[0]), rtol=0, atol=1e-5)
    rng = torch.Generator().manual_seed(0)
    scores = torch.rand(mass.shape, generator=rng)
    for count in (1, 2, 3):
        assert am.captured_mass(mass, mass, count) >= am.captured_mass(mass, scores, count) - 1e-7
    assert am.captured_mass(mass, mass, 1) < am.captured_mass(mass, mass, 3) <= 1 + 1e-6
    assert am.blocks_for(mass, 0.9) >= 1 and am.blocks_for(mass, 1.0 - 1e-9) <= mass.shape[1]
    assert am.tile_argument("4") == (1, 4, 4) and am.tile_argument("2x4x8") == (2, 4, 8)
    two_frames = torch.tensor([[0.7, 0.3], [0.2, 0.8]])  # 32-token blocks, one frame each in raster order
    assert am.own_frame_mass(two_frames, 32, 32, 32) == pytest.approx(0.75)
    interleaved = torch.stack([torch.arange(32), torch.arange(32, 64)], dim=1).reshape(-1)  # both blocks start in frame 0
    assert am.own_frame_mass(two_frames, 32, 32, 32, order=interleaved) == pytest.approx(1.0)


def test_attention_mass_token_bounds_on_a_peaked_row():
    """Every query attends (almost) only to key 0: the top key holds all the mass and 1 of N weights is above
    the row average 1/N."""
    from slaconv.quality import attention_stats as am

    n, d = 256, 16
    k = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 0.01
    k[0, 0] = 1.0
    q = torch.zeros(n, d)
    q[:, 0] = 400.0
    (top,), above = am.token_topk_mass(q, k, [1 / n], row_stride=1)
    assert top > 0.999 and above == pytest.approx(1 / n)


def test_top_p_spends_the_top_k_budget_unevenly():
    """top_p_captured_mass: on a map with one concentrated and one flat query block, top-p at a mean of 2 blocks
    gives the flat block 3 and the concentrated one 1 (one p for the map), and holds the mass of exactly those
    blocks; the best spread of the same total is the map's largest entries."""
    from slaconv.quality import attention_stats as am

    mass = torch.tensor([[0.70, 0.10, 0.10, 0.05, 0.05], [0.22, 0.21, 0.20, 0.19, 0.18]])
    held, count = am.top_p_captured_mass(mass, mass.log(), n_select=2)
    assert count == pytest.approx(2.0)
    assert held == pytest.approx((0.70 + 0.22 + 0.21 + 0.20) / 2)
    top_k = float(mass.topk(2, dim=-1).values.sum(dim=-1).mean())
    assert top_k == pytest.approx((0.80 + 0.43) / 2) and held > top_k
    best = float(mass.flatten().topk(4).values.sum() / 2)
    assert best == pytest.approx((0.70 + 0.22 + 0.21 + 0.20) / 2)


def test_stable_rank_matches_svd_and_the_tail_drops_the_kept_blocks():
    """stable_rank equals ||A||_F^2 / sigma_max^2 from an exact SVD, and the tail is P with each query block's
    top-mass key blocks zeroed (checked against an SVD of that map built independently)."""
    from slaconv.quality import attention_stats as am

    g = torch.Generator().manual_seed(4)
    a = torch.randn(96, 64, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    assert am.stable_rank(a, iters=200) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
    q, k = torch.randn(128, 16, generator=g), torch.randn(128, 16, generator=g)
    full, tail = am.tail_stable_ranks(q, k, 32, 16, n_select=2)
    p = torch.softmax(q @ k.t() / 4.0, dim=-1).double()
    sp = torch.linalg.svdvals(p)
    assert full == pytest.approx(float((sp**2).sum() / sp[0] ** 2), rel=1e-3)
    assert 1.0 <= tail and tail != pytest.approx(full, rel=1e-3)
    mass = am.block_mass(q, k, 32, 16)
    keep = mass.topk(2, dim=-1).indices
    mask = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, keep, True)
    tail_p = p.masked_fill(mask.repeat_interleave(32, 0).repeat_interleave(16, 1), 0.0)
    st = torch.linalg.svdvals(tail_p)
    assert tail == pytest.approx(float((st**2).sum() / st[0] ** 2), rel=1e-3)


def _tail_inputs(n=512, d=16, heads=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    return q * 1.5, k * 1.5, v  # sharper than unit logits, so blocks differ in mass


def test_tail_estimators_match_an_independent_fp64_computation():
    """Dense output and lse, the sparse branch, the exact tail and its mass, the linear tails (SLA2's phi, the
    plain mean) against dense fp64 attention with the block mask expanded to tokens; the exact tail inside the
    shared normaliser is dense attention; Hedgehog features are nonnegative and sum to 2."""
    from slaconv.quality import tail_estimators as te

    q, k, v = _tail_inputs()
    bq, bk, n = 64, 32, q.shape[2]
    lut = te.heuristic_lut(q, k, 3, bq, bk)
    keep = reference.lut_to_mask(lut, n // bk).repeat_interleave(bq, 2).repeat_interleave(bk, 3)  # (1, H, N, N)
    assert lut.shape == (1, 2, n // bq, 3) and int(keep[0, 0, 0].sum()) == 3 * bk
    s = q.double() @ k.double().transpose(-1, -2) / 4.0
    p = torch.softmax(s, dim=-1)
    vd = v.double()

    o, lse = te.dense_attention(q, k, v)
    torch.testing.assert_close(o.double(), p @ vd, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=2e-5)
    o_s, lse_s = te.sparse_branch(q, k, v, lut, bq, bk)
    p_sel = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(o_s.double(), p_sel @ vd, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse_s.double(), torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1),
                               rtol=0, atol=2e-5)
    o_t, m = te.exact_tail(o, lse, o_s, lse_s)
    mass = (p * keep).sum(-1, keepdim=True)
    assert 0.05 < float(mass.mean()) < 0.95
    torch.testing.assert_close(m.double(), mass, rtol=0, atol=1e-5)
    s_tail = s.masked_fill(keep, float("-inf"))
    torch.testing.assert_close(o_t.double(), torch.softmax(s_tail, -1) @ vd, rtol=0, atol=1e-4)
    # the exact tail inside the shared normaliser (its own lse beside the selected one) is dense attention
    w = torch.sigmoid(lse_s.double() - torch.logsumexp(s_tail, -1)).unsqueeze(-1)
    torch.testing.assert_close(w * o_s.double() + (1 - w) * o_t.double(), p @ vd, rtol=0, atol=1e-4)

    rest = (~keep).double()
    for phi in (te.softmax_features, te.constant_features):
        kern = (phi(q).double() @ phi(k).double().transpose(-1, -2)) * rest
        expect = (kern @ vd) / (kern.sum(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(te.kernel_tail(phi(q), phi(k), v, lut, bq, bk).double(), expect, rtol=0, atol=1e-5)
    torch.testing.assert_close(te.kernel_tail(te.constant_features(q), te.constant_features(k), v, lut, bq, bk).double(),
                               (rest @ vd) / rest.sum(-1, keepdim=True), rtol=0, atol=1e-5)
    # over every key block: plain linear attention, the same for any LUT
    kern = te.softmax_features(q).double() @ te.softmax_features(k).double().transpose(-1, -2)
    torch.testing.assert_close(te.kernel_tail(te.softmax_features(q), te.softmax_features(k), v, lut, bq, bk,
                                              over_all=True).double(),
                               (kern @ vd) / (kern.sum(-1, keepdim=True) + 1e-6), rtol=0, atol=1e-5)

    w_hh = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    feats = te.hedgehog_features(q, w_hh)
    assert feats.shape[-1] == 16 and feats.min() > 0
    torch.testing.assert_close(feats.sum(-1), torch.full(feats.shape[:-1], 2.0), rtol=0, atol=1e-5)


def test_pooled_tail_with_one_key_per_block_is_dense_attention_and_its_fitted_bias_is_zero():
    """With one key per block the pooled logit q . k / sqrt(d) + log(1) is the exact logit, so the pooled tail in
    the shared normaliser is dense attention (fp64 oracle), and the bias fit on such rows finds 0; with 32-key
    blocks it is not exact."""
    from slaconv.quality import tail_estimators as te
    from slaconv.quality import tail_fit as tf

    q, k, v = _tail_inputs(n=256)
    dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, dim=-1) @ v.double()
    for bk, exact in ((1, True), (32, False)):
        lut = te.heuristic_lut(q, k, 3, 64, bk)
        o_s, lse_s = te.sparse_branch(q, k, v, lut, 64, bk)
        t, gap = te.pooled_parts(q, k, v, lut, lse_s, 64, bk)
        err = float((te.pooled_mix(o_s, t, gap).double() - dense).norm() / dense.norm())
        assert (err < 1e-5) if exact else (err > 1e-2), (bk, err)
    rows = tf.fit_rows(q, k, v, {0.05: 3}, 64, 1, 2, torch.Generator().manual_seed(0))
    assert tf.fit_pooled_bias([rows], 0.05, 64, 1).abs().max() <= 0.02 + 1e-6


def test_least_squares_alpha_and_finer_mixing_are_never_worse():
    """mix_stats' quadratic equals the directly computed mixed error; the least-squares per-head alpha is no worse
    than 0.5, 0 or 1, per-query alpha no worse than per head; the Hedgehog fit lowers its loss."""
    from slaconv.quality import tail_estimators as te
    from slaconv.quality import tail_fit as tf

    q, k, v = _tail_inputs()
    lut = te.heuristic_lut(q, k, 2, 64, 32)
    o, _ = te.dense_attention(q, k, v)
    o_s, _ = te.sparse_branch(q, k, v, lut, 64, 32)
    tail = te.kernel_tail(te.softmax_features(q), te.softmax_features(k), v, lut, 64, 32)
    st = te.mix_stats(o, o_s, tail, 64)
    alpha = te.least_squares_alpha(st["a2"].sum(dim=(0, 2)), st["a1"].sum(dim=(0, 2)))
    assert 0 < float(alpha.min()) and float(alpha.max()) < 1

    def err(a):
        return te.mixed_squared_error(st, a.view(1, -1, 1)).sum(dim=(0, 2))

    direct = (te.mix(o_s, tail, alpha.float()) - o).double().square().sum(dim=(0, 2, 3))
    torch.testing.assert_close(err(alpha), direct, rtol=1e-4, atol=0)
    for other in (0.5, 0.0, 1.0):
        assert bool((err(alpha) <= err(torch.full_like(alpha, other)) + 1e-12).all())
    assert bool((st["row_best"].sum(dim=(0, 2)) <= err(alpha) + 1e-12).all())

    rows = tf.fit_rows(q, k, v, {0.1: 2}, 64, 32, 4, torch.Generator().manual_seed(0))
    _, _, curve = tf.train_hedgehog([rows], 8, (0.1,), 64, 32, steps=20, lr=0.1)
    assert curve[-1] < 0.9 * curve[0], curve


def test_pooled_mass_alpha_fits_minimise_the_error_on_their_rows():
    """The per-query alphas from the pooled tail mass: the fitted shift beats its neighbours and the mass-matched
    shift, the affine map beats the shift, the per-head alpha is least squares, all on the rows they were fitted on;
    the mass-matched shift is the mean of lse_pool - lse_tail from a dense fp64 computation."""
    from slaconv.quality import tail_estimators as te
    from slaconv.quality import tail_fit as tf
    from slaconv.quality import tail_mixing as tm

    q, k, v = _tail_inputs()
    rows = tf.fit_rows(q, k, v, {0.1: 2}, 64, 32, 4, torch.Generator().manual_seed(0))
    features = (tf.hedgehog_init(2, 16, 8, seed=1), tf.hedgehog_init(2, 16, 8, seed=2))
    fits = tm.fit_layer([rows], features, (0.1,), 64, 32)[0.1]
    lut = rows.luts[0.1]
    gap = tm.mass_gap(rows.q, k, lut, rows.lse_s[0.1], 64, 32)
    for kind in tm.TAILS:
        if kind == "exact":
            tail = te.exact_tail(rows.o, rows.lse, rows.o_s[0.1], rows.lse_s[0.1])[0]
        else:
            tail = tm.tail_of(kind, rows.q, k, v, lut, 64, 32, features)

        def err(mixing, p, kind=kind, tail=tail):
            a = tm.alpha(mixing, p, gap).float()
            return (a * rows.o_s[0.1] + (1 - a) * tail - rows.o).double().square().sum(dim=(0, 2, 3))

        p = fits[kind]
        shift = err("shift", p["shift"])
        for other in (p["shift"] - 0.1, p["shift"] + 0.1, p["mass"]):
            assert bool((shift <= err("shift", other) + 1e-9).all())
        assert bool((err("affine", p["affine"]) <= shift * (1 + 1e-4)).all())
        for delta in (-0.01, 0.01):
            assert bool((err("head_train", p["head_train"]) <= err("head_train", p["head_train"] + delta) + 1e-9).all())
    s = rows.q.double() @ k.double().transpose(-1, -2) / 4.0
    selected = reference.lut_to_mask(lut, 16).repeat_interleave(64, 2).repeat_interleave(32, 3)
    lse_tail = torch.logsumexp(s.masked_fill(selected, float("-inf")), dim=-1)
    lse_pool = rows.lse_s[0.1].double() - gap.double()
    torch.testing.assert_close(fits["linear"]["mass"], (lse_pool - lse_tail).mean(dim=(0, 2)), rtol=0, atol=1e-4)


def test_tail_study_runs_end_to_end(tmp_path):
    """The study's command on a tiny 1-layer model: tables written, the exact tail with per-query alpha is exact,
    finer alpha never worse, the study's fp32 dense hook keeps the model's loss, the replaced forwards change it;
    a spent --max-minutes cuts the Hedgehog fit to one step and the held-out sets to two samples."""
    from slaconv.quality import tail_study

    folder = tmp_path / "orig"
    common.build_model({**common.SMOKE_MODEL_CONFIG, "num_layers": 1}, seed=0).save_pretrained(folder / "model")
    (folder / "train_summary.json").write_text(json.dumps({"spec": sv.SMOKE_SPEC.to_dict(), "settings": {}}))
    tail_study.main(["--model", str(folder / "model"), "--out", str(tmp_path / "out"), "--heldout", "3",
                     "--stats-videos", "1", "--fractions", "0.03", "0.1", "--train-videos", "1", "--fit-blocks", "2",
                     "--hedgehog-steps", "50", "--max-minutes", "1e-4", "--threads", "1"])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "Tail estimators at fixed sparsity" in (tmp_path / "out" / "results.md").read_text()
    assert set(res["errors"]["heuristic"]) == {"0.1", "0.03"}
    assert res["settings"]["error_samples"] == 2 and res["settings"]["loss_samples"] == 2
    assert {fit["hedgehog_fit"]["hedgehog"]["steps"] for fit in res["fits"].values()} == {1}
    assert res["losses"]["dense_fp32"]["0.03"]["ratio"] == pytest.approx(1.0, abs=1e-4)
    for router in ("heuristic", "oracle"):
        for rows in res["errors"][router].values():
            assert rows["exact_query"]["mean"] < 1e-4
            for tail in ("exact", "linear", "mean", "hedgehog"):
                assert rows[f"{tail}_query"]["mean"] <= rows[f"{tail}_head"]["mean"] + 1e-9
            for tail in ("linear", "hedgehog"):  # alphas fitted on other rows: worse than the closed form here
                for mixing in ("head_train", "shift", "affine", "mass", "query_linear", "gap_query_linear"):
                    assert rows[f"{tail}_query"]["mean"] <= rows[f"{tail}_{mixing}"]["mean"] + 1e-9
            assert rows["exact_head"]["mean"] <= rows["sparse"]["mean"] + 1e-9
    original = res["original_losses"]
    assert len(original) == 2 and res["losses"]["linear_converter"]["0.03"]["per_sample"] != original
    assert all(v["0.03"]["ratio_ci"][0] <= v["0.03"]["ratio"] <= v["0.03"]["ratio_ci"][1]
               for v in res["losses"].values())


def test_tile_order_context_hands_hooks_tiled_tokens_and_is_exact():
    """Inside tile_order_context a hook sees Q, K, V in tile order, and a dense replacement computed there gives
    the model's own output: what the tail study measures with --tile is what a tiled model computes."""
    from slaconv.quality import attention_stats as am
    from slaconv.quality import tail_study
    from slaconv.token_order import tile_permutation

    model = common.build_model({**common.SMOKE_MODEL_CONFIG, "num_layers": 1}, seed=0).eval()
    spec = sv.SMOKE_SPEC
    hs = metrics.heldout_set(spec, 1)
    s = hs["sigma"].view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * hs["x0"] + s * hs["noise"]
    n = spec.tokens((1, 2, 2))
    order = tile_permutation((spec.frames, spec.size // 2, spec.size // 2), (2, 4, 4))
    seen = []

    def dense(index, q, k, v):
        seen.append(q.clone())
        return tail_study.dense_output(q, k, v)

    with torch.no_grad():
        with am.record_self_attention(n, values=True) as raster:
            want = common.velocity(model, x_t, hs["sigma"], hs["emb"])
        with am.tile_order_context(order), am.self_attention_hook(n, dense):
            got = common.velocity(model, x_t, hs["sigma"], hs["emb"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen[0].float().transpose(1, 2), raster[0][0][:, :, order])


def test_block_mass_gap_pools_the_tail_from_each_query_blocks_mean_query():
    """The block-pooled log-odds: each row's own lse_sel minus the log-sum-exp, over the key blocks its query
    block did not select, of mean(q over the block) . mean(K_j) / sqrt(d) + log(block_k), in fp64 loops."""
    from slaconv.quality import tail_estimators as te
    from slaconv.quality import tail_mixing as tm

    q, k, v = (x.double() for x in _tail_inputs())
    block_q, block_k = 64, 32
    lut = te.heuristic_lut(q, k, 3, block_q, block_k)
    lse_s = te.sparse_branch(q, k, v, lut, block_q, block_k)[1]
    got = tm.block_mass_gap(q, k, lut, lse_s, block_q, block_k)
    n, d = q.shape[2], q.shape[3]
    want = torch.empty_like(got)
    for h in range(q.shape[1]):
        for qb in range(n // block_q):
            rows = slice(qb * block_q, (qb + 1) * block_q)
            q_bar = q[0, h, rows].mean(dim=0)
            chosen = set(lut[0, h, qb].tolist())
            pooled = [q_bar @ k[0, h, j * block_k:(j + 1) * block_k].mean(dim=0) / d ** 0.5 + math.log(block_k)
                      for j in range(n // block_k) if j not in chosen]
            want[0, h, rows] = lse_s[0, h, rows] - torch.logsumexp(torch.stack(pooled), dim=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, tm.mass_gap(q, k, lut, lse_s, block_q, block_k))  # per row it differs


def test_block_pooled_alpha_fits_recover_an_alpha_built_from_the_block_gap():
    """Rows whose best alpha is sigmoid(a gap_block + w . q / sqrt(d) + c): block_gap_query_linear gets the
    training error near 0; block_affine, without w . q, cannot, nor block_query_linear (a fixed at 1), which
    recovers rows built with a = 1."""
    from slaconv.quality import tail_mixing as tm

    g = torch.Generator().manual_seed(1)
    heads, rows, d = 2, 512, 8
    q = torch.randn(heads, rows, d, generator=g, dtype=torch.float64)
    w = torch.randn(heads, d, generator=g, dtype=torch.float64)
    gap, gap_block = (torch.randn(heads, rows, generator=g, dtype=torch.float64) for _ in range(2))
    best = torch.sigmoid(0.7 * gap_block + (q * w.unsqueeze(1)).sum(-1) / d ** 0.5 - 0.2)
    best_unit = torch.sigmoid(gap_block + (q * w.unsqueeze(1)).sum(-1) / d ** 0.5 - 0.2)
    a2 = torch.rand(heads, rows, generator=g, dtype=torch.float64) + 0.5
    a1, a0 = -a2 * best, a2 * best.square()
    params = tm.fit(a2, a1, a0, gap, torch.full_like(gap, float("nan")), q, gap_block=gap_block)

    def error(mixing):
        alpha = tm.alpha(mixing, params[mixing], gap.unsqueeze(0), q.unsqueeze(0), gap_block.unsqueeze(0))
        alpha = alpha[0, ..., 0]
        return float((a2 * alpha.square() + 2 * a1 * alpha + a0).sum())

    assert error("block_gap_query_linear") < 1e-3 * error("head_train")
    assert error("block_affine") > 10 * error("block_gap_query_linear")
    assert error("block_shift") >= error("block_affine") * (1 - 1e-6)
    assert error("gap_query_linear") > 10 * error("block_gap_query_linear")  # the per-row gap is not this one
    assert error("block_query_linear") > 10 * error("block_gap_query_linear")  # its gap has scale 1, not 0.7

    a1_unit, a0_unit = -a2 * best_unit, a2 * best_unit.square()
    unit = tm.fit(a2, a1_unit, a0_unit, gap, torch.full_like(gap, float("nan")), q, gap_block=gap_block)
    alpha = tm.alpha("block_query_linear", unit["block_query_linear"], gap.unsqueeze(0), q.unsqueeze(0),
                     gap_block.unsqueeze(0))[0, ..., 0]
    assert torch.allclose(alpha, best_unit, atol=1e-3)


def test_query_linear_alpha_recovers_an_alpha_that_depends_on_the_query():
    """Rows whose best alpha is sigmoid(w . q / sqrt(d) + c): the query-linear fit gets the training error near 0,
    far below the best per-head alpha, and the gap-free fit ignores the gap."""
    from slaconv.quality import tail_mixing as tm

    g = torch.Generator().manual_seed(0)
    heads, rows, d = 2, 512, 8
    q = torch.randn(heads, rows, d, generator=g, dtype=torch.float64)
    w = torch.randn(heads, d, generator=g, dtype=torch.float64)
    best = torch.sigmoid((q * w.unsqueeze(1)).sum(-1) / d ** 0.5 + 0.3)  # (H, R)
    # squared error a2 alpha^2 + 2 a1 alpha + a0 with its minimum at alpha = best: a1 = -a2 best
    a2 = torch.rand(heads, rows, generator=g, dtype=torch.float64) + 0.5
    a1, a0 = -a2 * best, a2 * best.square()
    gap = torch.randn(heads, rows, generator=g, dtype=torch.float64)
    params = tm.fit(a2, a1, a0, gap, torch.full_like(gap, float("nan")), q)

    def error(mixing):
        alpha = tm.alpha(mixing, params[mixing], gap.unsqueeze(0), q.unsqueeze(0))[0, ..., 0]
        return float((a2 * alpha.square() + 2 * a1 * alpha + a0).sum())

    assert error("query_linear") < 1e-3 * error("head_train")
    assert error("gap_query_linear") < 1e-3 * error("head_train")
