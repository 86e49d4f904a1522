"""PhotoVideo: camera motion over photographs (determinism, motion, range, held-out photos, conditioning)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from slaconv.errors import InputError
from slaconv.quality import common, content, metrics
from slaconv.quality import photovideo as pv

TRAIN, HELD = ("a.png", "b.png", "c.png"), ("d.png", "e.png")


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """Five random RGB photos of different shapes (fresh content each run), and $SLACONV_PHOTOS pointing at them."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    for i, name in enumerate(TRAIN + HELD):
        h, w = 60 + 7 * i, 90 - 5 * i
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / name)
    monkeypatch.setenv(pv.PHOTOS_ENV, str(tmp_path))
    return tmp_path


def small_spec(**kw) -> pv.PhotoSpec:
    return pv.PhotoSpec(frames=4, size=16, photo_res=48, train_photos=TRAIN, heldout_photos=HELD, **kw)


def test_deterministic_and_order_free(photos):
    spec = small_spec()
    a, ya = pv.generate(0, range(6), spec)
    b, yb = pv.generate(0, [5, 4, 3, 2, 1, 0], spec)
    assert torch.equal(a, b.flip(0)) and torch.equal(ya, yb.flip(0))
    c, _ = pv.generate(0, range(6, 12), spec)
    assert not torch.equal(a, c)  # other indices, other videos
    assert a.shape == (6, 3, 4, 16, 16)


def test_value_range_and_content(photos):
    spec = small_spec()
    video, _ = pv.generate(0, range(18), spec, labels=range(18))
    assert video.min() >= -1 and video.max() <= 1
    # every video carries its photo's detail: bilinear sampling smooths a little, it never flattens
    photo_std = min(float(t.std()) for t in pv.photo_bank(spec).values()) * 2  # in [-1, 1] units
    assert (video.flatten(1).std(dim=1) > 0.5 * photo_std).all()


def test_pan_of_k_pixels_shifts_content_by_k(photos):
    photo = pv.load_photo(photos, "a.png", 48)
    _, h, w = photo.shape
    k, size, frames = 3, 16, 4
    x0, y0 = 5, 7  # top-left photo pixel of frame 0
    m = (size - 1) / 2
    shot = pv.Shot("a.png", cx=x0 + m + k * torch.arange(frames, dtype=torch.float32),
                   cy=torch.full((frames,), y0 + m), zoom=torch.ones(frames), angle=torch.zeros(frames))
    video = pv.render_shot(photo, shot, size)
    for t in range(frames):  # each frame is the photo's crop, k pixels further right per frame
        crop = photo[:, y0 : y0 + size, x0 + k * t : x0 + k * t + size]
        torch.testing.assert_close(video[:, t], crop, atol=1e-5, rtol=0)
    torch.testing.assert_close(video[:, 1, :, : size - k], video[:, 0, :, k:], atol=1e-5, rtol=0)


def test_every_window_stays_inside_its_photo(photos):
    spec = small_spec()
    bank = pv.photo_bank(spec)
    sizes = {n: tuple(t.shape[1:]) for n, t in bank.items()}
    m = (spec.size - 1) / 2
    for i in range(60):
        p = pv.sample_params(0, i, spec, sizes, label=i)
        for shot in [p.shot] + ([p.fade_to] if p.fade_to is not None else []):
            h, w = sizes[shot.photo]
            for c in ((-m, -m), (m, -m), (-m, m), (m, m)):
                cos, sin = torch.cos(shot.angle), torch.sin(shot.angle)
                x = shot.cx + shot.zoom * (cos * c[0] - sin * c[1])
                y = shot.cy + shot.zoom * (sin * c[0] + cos * c[1])
                assert x.min() >= 0 and x.max() <= w - 1 and y.min() >= 0 and y.max() <= h - 1, (i, p.motion)
        if p.motion.startswith("pan"):
            dx, dy = pv.PAN_DIRECTIONS[p.motion]
            step_x, step_y = shot.cx.diff(), shot.cy.diff()
            assert (step_x * dx >= 0).all() and (step_y * dy >= 0).all() and (step_x.abs() + step_y.abs() > 0).all()


def test_heldout_stream_uses_only_heldout_photos(photos):
    spec = small_spec()
    sizes = {n: tuple(t.shape[1:]) for n, t in pv.photo_bank(spec).items()}
    held = {pv.sample_params(spec.heldout_stream, i, spec, sizes).shot.photo for i in range(40)}
    train = {pv.sample_params(0, i, spec, sizes).shot.photo for i in range(40)}
    assert held == set(HELD) and train == set(TRAIN)
    fades = [pv.sample_params(spec.heldout_stream, i, spec, sizes, label=8) for i in range(10)]
    assert all(p.motion == "cross-fade" and p.fade_to.photo in HELD for p in fades)
    with pytest.raises(ValueError, match="both trained on and held out"):
        pv.PhotoSpec(train_photos=("a.png", "b.png"), heldout_photos=("b.png",))


def test_labels_name_photo_and_motion(photos):
    spec = small_spec()
    _, y = pv.generate(spec.heldout_stream, range(10), spec, labels=range(10))
    for request, label in enumerate(y.tolist()):
        photo, motion = divmod(label, len(pv.MOTIONS))
        assert spec.photos[photo] == HELD[request % len(HELD)] and motion == request % len(pv.MOTIONS)
    table = pv.class_embeddings(spec)
    assert table.shape == (spec.num_classes, spec.text_len, spec.text_dim)
    # same photo -> same photo tokens; same motion -> same motion tokens; different otherwise
    assert torch.equal(table[0, :2], table[1, :2]) and torch.equal(table[0, 2:], table[len(pv.MOTIONS), 2:])
    assert not torch.equal(table[0, 2:], table[1, 2:]) and not torch.equal(table[0, :2], table[len(pv.MOTIONS), :2])
    assert pv.label_name(spec, len(pv.MOTIONS) + 4) == "b, zoom in"


def test_saved_spec_round_trip_and_heldout_set(photos):
    spec = small_spec()
    again = content.spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert content.spec_from_dict({"frames": 4}) == content.spec_with(False, {"frames": 4})  # SynthVideo
    hs = metrics.heldout_set(spec, 4, sigmas=(0.5,))
    assert hs["x0"].shape == (4, 3, 4, 16, 16)
    photos_used = {spec.photos[y // len(pv.MOTIONS)] for y in hs["labels"].tolist()}
    assert photos_used <= set(HELD)
    assert torch.equal(hs["emb"], pv.class_embeddings(spec)[hs["labels"]])


def test_missing_photo_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        pv.load_photo(tmp_path, "nope.png", 32)


def test_train_and_reload_on_photos(photos, tmp_path):
    from slaconv.quality import train_dit

    spec = pv.PhotoSpec(frames=2, size=16, photo_res=48, train_photos=TRAIN, heldout_photos=HELD)
    summary = train_dit.train(tmp_path / "dit", smoke=True, steps=2, spec=spec, log=lambda *a: None)
    loaded, _ = common.trained_spec(tmp_path / "dit" / "model")
    assert loaded == spec and math.isfinite(summary["heldout_fm_loss"]["loss"])
    assert summary["model_config"]["in_channels"] == 3 and (tmp_path / "dit" / "samples.png").is_file()


def test_real_photos_when_present():
    try:
        folder = pv.photo_dir()
    except InputError:
        pytest.skip("no photo folder")
    spec = pv.PhotoSpec(frames=2, size=32, photo_res=96)
    if not all((folder / n).is_file() for n in spec.photos):
        pytest.skip(f"{folder} lacks some photos")
    for seed in (0, spec.heldout_stream):
        video, _ = pv.generate(seed, range(len(pv.MOTIONS)), spec, labels=range(len(pv.MOTIONS)))
        assert video.min() >= -1 and video.max() <= 1 and video.std() > 0.05


def test_batched_render_equals_each_shot_alone(photos):
    spec = small_spec()
    bank = pv.photo_bank(spec)
    sizes = {n: tuple(t.shape[1:]) for n, t in bank.items()}
    params = [pv.sample_params(0, i, spec, sizes, label=i) for i in range(18)]  # every motion, cross-fades too
    batch = pv.render(params, spec, bank)
    for p, video in zip(params, batch):
        alone = pv.render_shot(bank[p.shot.photo], p.shot, spec.size)
        if p.fade_to is not None:
            w = p.fade.view(1, -1, 1, 1)
            alone = alone * (1 - w) + pv.render_shot(bank[p.fade_to.photo], p.fade_to, spec.size) * w
        torch.testing.assert_close(video, alone.clamp(0, 1) * 2 - 1, atol=1e-6, rtol=0)
