"""`slaconv prepare`: media + captions -> a --data folder, through a tiny local Wan pipeline (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import dir_snapshot, fails, make_wan, run, write_recipe
from hubfake import use_as_default_endpoint
from slaconv.data import CalibrationDataset
from slaconv.errors import InputError
from slaconv.prepare import prepare_dataset, read_captions

PIL = pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

Z_DIM, TEXT_DIM, MAX_LEN = 4, 16, 512
H, W, F = 32, 64, 5  # latents (4, 2, 4, 8): 2*2*4 = 16 transformer tokens
WORDS = "a an the cat dog red blue green video of on in running sitting sky over field".split()
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A diffusers-format Wan pipeline folder holding only a tiny vae/, text_encoder/ and tokenizer/."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("pipe") / "Wan-tiny"
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=3, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                     latents_std=LATENTS_STD).save_pretrained(root / "vae")
    cfg = UMT5Config(vocab_size=len(VOCAB), d_model=TEXT_DIM, num_layers=1, num_heads=2, d_kv=8, d_ff=32,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return root


def _gradient(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 1, generator=g) * 255
    ramp = torch.linspace(0, 1, w).view(1, 1, w) * torch.linspace(0.2, 1, h).view(1, h, 1)
    arr = (base * ramp).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture
def media(tmp_path) -> Path:
    """Stills of several sizes/modes, a 6-frame GIF, a frame folder, and captions.jsonl for them."""
    d = tmp_path / "media"
    d.mkdir()
    _gradient(120, 80, 1).save(d / "wide.png")
    _gradient(50, 90, 2, "RGBA").save(d / "tall.png")
    _gradient(64, 64, 3).save(d / "square.jpg", quality=95)
    frames = [_gradient(100, 70, 10 + i, "P") for i in range(6)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=60, loop=0)
    (d / "walk").mkdir()
    for i in range(7):  # frame_2 < frame_10: natural order
        _gradient(96, 64, 20 + i).save(d / "walk" / f"frame_{i * 4}.png")
    rows = [("wide.png", "a red cat sitting on the field"), ("tall.png", "a dog running"),
            ("square.jpg", "the blue sky"), ("anim.gif", "a video of a green field"),
            ("walk", "a dog running over the field"), ("wide.png", "a red cat sitting on the field")]
    (d / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    return d


def prepare(out: Path, pipe: Path, captions: Path, *extra, code=0, frames=F):
    return run("prepare", out, "--pipeline", pipe, "--captions", captions, "--height", H, "--width", W,
               "--num-frames", frames, "--device", "cpu", *extra, code=code)


# ------------------------------------------------------------------------------------- happy path


def test_prepare_then_calibrate(tmp_path, tiny_pipeline, media):
    before = dir_snapshot(media), dir_snapshot(tiny_pipeline)
    out = tmp_path / "data"
    res = json.loads(prepare(out, tiny_pipeline, media / "captions.jsonl", "--json").stdout)
    assert res["num_samples"] == 6 and res["latent_shape"] == [Z_DIM, (F - 1) // 4 + 1, H // 8, W // 8]
    assert (dir_snapshot(media), dir_snapshot(tiny_pipeline)) == before  # inputs untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch removed

    ds = CalibrationDataset(out, expected_channels=Z_DIM, expected_text_dim=TEXT_DIM)
    assert ds.latent_shape == (Z_DIM, 2, H // 8, W // 8) and ds.text_shape == (MAX_LEN, TEXT_DIM)
    assert ds.dtype == torch.float32 and len(ds) == 6
    m = ds.manifest
    assert m["source"] == "prepare" and m["seed"] == 0 and m["num_frames"] == F
    assert [(r["file"], r["frames"], r["still"]) for r in m["items"]] == [
        ("wide.png", 1, True), ("tall.png", 1, True), ("square.jpg", 1, True), ("anim.gif", F, False),
        ("walk", F, False), ("wide.png", 1, True)]

    # prompt_embeds: real tokens (+ </s>) then exact zeros, as WanPipeline pads them.
    for i, n_tokens in [(0, 7 + 1), (1, 3 + 1), (2, 3 + 1)]:  # words + </s>
        emb = ds[i]["prompt_embeds"]
        assert (emb[:n_tokens].abs().sum(-1) > 0).all() and (emb[n_tokens:] == 0).all()
    # Same media + caption -> identical sample; a still's latent frames carry the same picture.
    assert torch.equal(ds[0]["latents"], ds[5]["latents"])
    assert torch.equal(ds[0]["prompt_embeds"], ds[5]["prompt_embeds"])
    assert not torch.equal(ds[3]["latents"], ds[4]["latents"])


    # And calibrate trains on it: a tiny Wan transformer with in_channels = z_dim, text_dim = D.
    model_dir = tmp_path / "transformer"
    make_wan(in_channels=Z_DIM, out_channels=Z_DIM, text_dim=TEXT_DIM).save_pretrained(model_dir)
    work = tmp_path / "work"
    # one step on a random tiny model may move the held-out loss (~1e-6) by a few percent either way: this
    # checks the data flows, so the worse-than-start guard is widened
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.heldout_tolerance": 1.0})
    run("convert", model_dir, "-o", work, "--recipe", recipe)
    cal = json.loads(run("calibrate", work, "--data", out, "--steps", 1, "--json").stdout)
    assert cal["stage1"]["steps"] == 1 and cal["stage2"]["steps"] == 1


def test_matches_wan_pipeline_encoding(tmp_path, tiny_pipeline, media):
    """Latents invert WanPipeline's decode normalisation exactly; embeds are the encoder's hidden states."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from slaconv.prepare import Item, load_video

    (media / "one.jsonl").write_text(json.dumps({"file": "anim.gif", "caption": "  a   video of&amp; a field "}) + "\n")
    info = prepare_dataset(tmp_path / "d", pipeline=str(tiny_pipeline), captions=media / "one.jsonl", height=H,
                           width=W, num_frames=F, show_progress=False)
    sample = load_file(str(tmp_path / "d" / "sample_00000.safetensors"))
    assert info["latent_shape"] == list(sample["latents"].shape)

    vae = AutoencoderKLWan.from_pretrained(tiny_pipeline / "vae").eval()
    video, _ = load_video(Item(media / "anim.gif", "anim.gif", "", ""), num_frames=F, height=H, width=W)
    assert video.shape == (3, F, H, W) and video.min() >= -1 and video.max() <= 1
    with torch.no_grad():
        raw = vae.encode(video[None]).latent_dist.mode()
    # WanPipeline's decode path: latents / (1 / std) + mean must give back the VAE's latents.
    mean = torch.tensor(vae.config.latents_mean).view(1, Z_DIM, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, Z_DIM, 1, 1, 1)
    torch.testing.assert_close(sample["latents"][None] / latents_std + mean, raw, rtol=1e-5, atol=1e-6)

    # Deterministic: the same run again gives byte-identical files.
    prepare_dataset(tmp_path / "d2", pipeline=str(tiny_pipeline), captions=media / "one.jsonl", height=H,
                    width=W, num_frames=F, show_progress=False)
    assert (tmp_path / "d" / "sample_00000.safetensors").read_bytes() == \
        (tmp_path / "d2" / "sample_00000.safetensors").read_bytes()

    tok = AutoTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    enc = UMT5EncoderModel.from_pretrained(tiny_pipeline / "text_encoder").eval()
    ids = tok(["a video of& a field"], return_tensors="pt").input_ids  # cleaned: html unescaped, spaces collapsed
    with torch.no_grad():
        ref = enc(ids).last_hidden_state[0]
    n = ids.shape[1]
    torch.testing.assert_close(sample["prompt_embeds"][:n], ref, rtol=1e-5, atol=1e-6)
    assert (sample["prompt_embeds"][n:] == 0).all()


def test_single_frame_bfloat16_and_caption_folder(tmp_path, tiny_pipeline, media):
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name in ("wide.png", "anim.gif"):
        (folder / name).write_bytes((media / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text("a red cat\n")
    res = json.loads(prepare(tmp_path / "d", tiny_pipeline, folder, "--dtype", "bfloat16", "--json",
                             frames=1).stdout)
    assert res["latent_shape"] == [Z_DIM, 1, H // 8, W // 8] and res["dtype"] == "bfloat16"
    ds = CalibrationDataset(tmp_path / "d")
    assert ds.dtype == torch.bfloat16 and [r["file"] for r in ds.manifest["items"]] == ["anim.gif", "wide.png"]


def test_csv_and_media_dir(tmp_path, media):
    csv = tmp_path / "caps.csv"
    csv.write_text('file,caption,extra\nwide.png,"a cat, sitting",x\n\nwalk,a dog,\n')
    items = read_captions(csv, media_dir=media)
    assert [(i.label, i.caption, i.kind) for i in items] == [("wide.png", "a cat, sitting", "image"),
                                                             ("walk", "a dog", "frames")]
    with pytest.raises(InputError, match=r"caps.csv:1: the header"):
        csv.write_text("path,text\nwide.png,cat\n")
        read_captions(csv, media_dir=media)


def test_hub_id_downloads_only_what_it_reads(fake_hub, tmp_path, tiny_pipeline, media, monkeypatch):
    use_as_default_endpoint(monkeypatch, fake_hub)
    files = {str(p.relative_to(tiny_pipeline)): p.read_bytes() for p in tiny_pipeline.rglob("*") if p.is_file()}
    files["transformer/config.json"] = b"{}"
    files["transformer/diffusion_pytorch_model.safetensors"] = b"not fetched"
    files["text_encoder/pytorch_model.bin"] = b"a pickle that must never be fetched"
    fake_hub.add_repo("acme/wan-tiny", files=files)
    (media / "one.jsonl").write_text(json.dumps({"file": "wide.png", "caption": "a cat"}) + "\n")
    plan = json.loads(prepare(tmp_path / "d", "acme/wan-tiny", media / "one.jsonl", "--dry-run", "--json").stdout)
    assert plan["latent_shape"] == [Z_DIM, 2, H // 8, W // 8] and plan["text_shape"] == [MAX_LEN, TEXT_DIM]
    assert not fake_hub.requests_to(r"\.safetensors$")  # a dry run fetches configs only
    res = json.loads(prepare(tmp_path / "d", "acme/wan-tiny", media / "one.jsonl", "--json").stdout)
    assert res["num_samples"] == 1 and res["revision"]
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in fake_hub.requests_to("/resolve/")}
    assert fetched and not any(f.startswith("transformer/") or f.endswith(".bin") for f in fetched)
    fails(3, "--offline", *_args(tmp_path / "d2", "acme/not-there", media / "captions.jsonl"),
          match="not in the Hub cache")


def test_dry_run_lists_and_writes_nothing(tmp_path, tiny_pipeline, media):
    plan = json.loads(prepare(tmp_path / "d", tiny_pipeline, media / "captions.jsonl", "--dry-run", "--json").stdout)
    assert plan["dry_run"] and plan["num_samples"] == 6
    assert plan["latent_shape"] == [Z_DIM, 2, H // 8, W // 8] and plan["text_shape"] == [MAX_LEN, TEXT_DIM]
    assert [(r["file"], r["kind"], r["frames"]) for r in plan["items"]][3:5] == [("anim.gif", "image", 6),
                                                                              ("walk", "frames", 7)]
    human = prepare(tmp_path / "d", tiny_pipeline, media / "captions.jsonl", "--dry-run").stdout
    assert "would encode 6 samples" in human and "anim.gif" in human
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------- bad inputs


def _args(out, pipe, captions, frames=F):
    return ("prepare", out, "--pipeline", pipe, "--captions", captions, "--height", H, "--width", W,
            "--num-frames", frames, "--device", "cpu")


def _nothing_written(tmp_path: Path, out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_media_file(tmp_path, tiny_pipeline, media):
    (media / "bad.jsonl").write_text(json.dumps({"file": "wide.png", "caption": "a cat"}) + "\n"
                                     + json.dumps({"file": "gone.mp4", "caption": "a dog"}) + "\n")
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "bad.jsonl"), match="bad.jsonl:2: media file not found")
    _nothing_written(tmp_path, tmp_path / "d")


def test_corrupt_images(tmp_path, tiny_pipeline, media):
    (media / "junk.png").write_bytes(b"this is not a png at all")
    (media / "j.jsonl").write_text(json.dumps({"file": "junk.png", "caption": "a cat"}) + "\n")
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "j.jsonl"), match="junk.png: not a readable image")
    # A valid header with truncated pixel data fails while encoding: still one line, nothing left behind.
    data = (media / "wide.png").read_bytes()
    (media / "cut.png").write_bytes(data[: len(data) // 2])
    (media / "c.jsonl").write_text(json.dumps({"file": "cut.png", "caption": "a cat"}) + "\n")
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "c.jsonl"), match="cut.png: cannot decode image")
    _nothing_written(tmp_path, tmp_path / "d")


def test_pipeline_without_vae(tmp_path, tiny_pipeline, media):
    broken = tmp_path / "pipe"
    for comp in ("text_encoder", "tokenizer"):
        (broken / comp).mkdir(parents=True)
        for f in (tiny_pipeline / comp).iterdir():
            (broken / comp / f.name).write_bytes(f.read_bytes())
    fails(3, *_args(tmp_path / "d", broken, media / "captions.jsonl"), match="no vae/")
    fails(3, *_args(tmp_path / "d", tmp_path / "nope", media / "captions.jsonl"), match="does not exist")
    _nothing_written(tmp_path, tmp_path / "d")


@pytest.mark.parametrize("content,match", [
    ('{"file": "wide.png", "caption": "x"}\n{"file": "wide.png"\n', "x.jsonl:2: invalid JSON"),
    ('{"file": "wide.png"}\n', "x.jsonl:1: missing key(s) caption"),
    ('["wide.png", "x"]\n', "x.jsonl:1: each line must be a JSON object"),
    ('{"file": "wide.png", "caption": "  "}\n', "x.jsonl:1: caption is empty"),
    ("\n\n", "no media with captions"),
])
def test_malformed_captions(tmp_path, tiny_pipeline, media, content, match):
    (media / "x.jsonl").write_text(content)
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "x.jsonl"), match=match)


def test_other_refusals(tmp_path, tiny_pipeline, media):
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "captions.jsonl", frames=9),
          match="anim.gif: has 6 frames but --num-frames is 9")
    fails(2, *_args(tmp_path / "d", tiny_pipeline, media / "captions.jsonl", frames=6), match="4k+1")
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media), match="anim.gif: no caption file anim.txt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    fails(7, *_args(tmp_path / "full", tiny_pipeline, media / "captions.jsonl"), match="not empty")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_video_without_a_decoder_names_the_package(tmp_path, tiny_pipeline, media, monkeypatch):
    import slaconv.prepare.media

    monkeypatch.setattr(slaconv.prepare.media, "_video_reader", lambda: None)  # as if neither av nor imageio
    (media / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (media / "v.jsonl").write_text(json.dumps({"file": "clip.mp4", "caption": "a dog"}) + "\n")
    fails(3, *_args(tmp_path / "d", tiny_pipeline, media / "v.jsonl"), match="pip install av")


def test_mp4_clip_when_pyav_is_installed(tmp_path, tiny_pipeline, media):
    av = pytest.importorskip("av")
    import numpy as np

    path = media / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(8):
            img = np.asarray(_gradient(160, 96, 40 + i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (media / "v.jsonl").write_text(json.dumps({"file": "clip.mp4", "caption": "a dog running"}) + "\n")
    res = json.loads(prepare(tmp_path / "d", tiny_pipeline, media / "v.jsonl", "--json").stdout)
    assert res["latent_shape"] == [Z_DIM, 2, H // 8, W // 8]
    assert CalibrationDataset(tmp_path / "d").manifest["items"][0]["frames"] == F
    fails(3, *_args(tmp_path / "d2", tiny_pipeline, media / "v.jsonl", frames=9),
          match="clip.mp4: has 8 frames but --num-frames is 9")
