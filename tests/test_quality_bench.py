"""The quality benchmark's smoke path (benchmarks/quality, DESIGN.md section 5) on the CPU.

Generator determinism, a classifier that learns above chance, a DiT trained for a few steps, and the
table driver running every row through the real slaconv CLI at tiny size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import qcommon as common  # noqa: E402
import metrics  # noqa: E402
import synthvideo as sv  # noqa: E402


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
    import train_classifier

    summary = train_classifier.train(tmp_path / "clf", smoke=True, lr=3e-3, device="cpu", log=lambda *_: None)
    chance = 1 / sv.SMOKE_SPEC.num_classes
    assert summary["heldout_clean"]["accuracy"] > chance + 0.15
    clf = metrics.load_classifier(tmp_path / "clf")
    x, y = sv.generate(common.HELDOUT_SEED, range(8), sv.SMOKE_SPEC)
    assert metrics.classifier_scores(clf, x, y)["accuracy"] >= 0


def test_smoke_pipeline_end_to_end(tmp_path):
    """Train the tiny DiT, then the table driver: every row through the real CLI."""
    import run_quality
    import train_classifier
    import train_dit

    quiet = lambda *_: None  # noqa: E731
    summary = train_dit.train(tmp_path / "dit", smoke=True, device="cpu", log=quiet)
    model_dir = tmp_path / "dit" / "model"
    assert (model_dir / "config.json").is_file() and summary["checkpoint_mb"] < 16
    assert (tmp_path / "dit" / "samples.png").is_file() and (tmp_path / "dit" / "loss_curve.png").is_file()
    log = [json.loads(line) for line in (tmp_path / "dit" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    train_classifier.train(tmp_path / "clf", smoke=True, steps=10, device="cpu", log=quiet)

    res = run_quality.run(model_dir, tmp_path / "q", classifier_dir=tmp_path / "clf", smoke=True, validate="first",
                          device="cpu", log=quiet)
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


def test_shipped_checkpoint_has_learned(tmp_path):
    """The shipped original (<= 16 MB, plain diffusers) predicts flow-matching velocities on fresh videos
    (a held-out seed never used in training) far better than an untrained model of the same architecture."""
    from diffusers import WanTransformer3DModel

    folder = QUALITY / "checkpoint" / "model"
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mb <= 16
    trained = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    untrained = common.build_model(json.loads((folder / "config.json").read_text()), seed=0).float().eval()
    torch.set_num_threads(2)
    hs = metrics.heldout_set(sv.VideoSpec(), 2, seed=9_001)  # 16,384-token videos from an unseen stream
    loss_trained = metrics.heldout_fm_loss(trained, hs, "cpu", batch_size=1)["loss"]
    loss_untrained = metrics.heldout_fm_loss(untrained, hs, "cpu", batch_size=1)["loss"]
    print(f"held-out FM loss: trained {loss_trained:.4f}, untrained {loss_untrained:.4f}")
    assert loss_trained < 0.5 * loss_untrained, (loss_trained, loss_untrained)
    assert loss_trained < 0.15, loss_trained  # training reported 0.0595 on its own held-out stream
