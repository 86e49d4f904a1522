"""The --data format: synthetic writer, loader, and every bad input it must reject cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slaconv.data import (
    MANIFEST,
    CalibrationDataset,
    collate,
    dataset_summary,
    write_dataset,
)
from slaconv.errors import InputError, OutputExistsError, UsageError
from slaconv.synthetic_data import synthetic_sample, write_synthetic_dataset

SHAPE = dict(channels=4, frames=3, height=8, width=12, text_len=10, text_dim=16)


def _write(path: Path, **kw) -> Path:
    args = dict(num_samples=3, seed=0, **SHAPE)
    args.update(kw)
    return write_synthetic_dataset(path, **args)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.fixture
def ds_dir(tmp_path: Path) -> Path:
    return _write(tmp_path / "data")


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def _set_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest))


def _bad(root: Path, match: str, **kw) -> str:
    with pytest.raises(InputError, match=match) as info:
        CalibrationDataset(root, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------- round trip


def test_round_trip_shapes_and_values(ds_dir: Path):
    ds = CalibrationDataset(ds_dir, expected_channels=4, expected_text_dim=16)
    assert len(ds) == 3
    assert ds.latent_shape == (4, 3, 8, 12) and ds.text_shape == (10, 16) and ds.image_shape is None
    item = ds[1]
    assert set(item) == {"latents", "prompt_embeds"}
    assert item["latents"].shape == (4, 3, 8, 12) and item["latents"].dtype == torch.float32
    assert item["prompt_embeds"].shape == (10, 16)
    expected = synthetic_sample(0, 1, **SHAPE)
    assert torch.equal(item["latents"], expected["latents"])
    # Not trivial: unit-variance, spatially correlated latents; non-zero text embeddings.
    lat = item["latents"]
    assert abs(float(lat.std()) - 1.0) < 0.05 and abs(float(lat.mean())) < 0.05
    a, b = lat[..., :-1].flatten(), lat[..., 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.5
    assert item["prompt_embeds"].abs().sum(-1).gt(0).any()
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["latents"].shape == (3, 4, 3, 8, 12) and batch["prompt_embeds"].shape == (3, 10, 16)


def test_determinism(tmp_path: Path):
    a, b, c = _write(tmp_path / "a"), _write(tmp_path / "b"), _write(tmp_path / "c", seed=1)
    assert _files(a) == _files(b)
    fa, fc = _files(a), _files(c)
    assert all(fa[name] != fc[name] for name in fa if name.endswith(".safetensors"))
    # Sample i depends only on (seed, i): more samples keep the earlier ones.
    d = _write(tmp_path / "d", num_samples=4)
    assert (d / "sample_00002.safetensors").read_bytes() == fa["sample_00002.safetensors"]
    # Different samples of one dataset differ.
    assert fa["sample_00000.safetensors"] != fa["sample_00001.safetensors"]


def test_bfloat16_and_image_embeds(tmp_path: Path):
    root = _write(tmp_path / "i2v", dtype=torch.bfloat16, image_len=5, image_dim=8)
    ds = CalibrationDataset(root)
    assert ds.dtype == torch.bfloat16 and ds.image_shape == (5, 8)
    item = ds[0]
    assert item["image_embeds"].shape == (5, 8) and item["latents"].dtype == torch.bfloat16
    assert collate([item, ds[1]])["image_embeds"].shape == (2, 5, 8)
    summary = dataset_summary(root)
    assert summary["num_samples"] == 3 and summary["dtype"] == "bfloat16" and summary["image_shape"] == [5, 8]
    assert summary["source"] == "synthetic" and summary["total_bytes"] > 0
    json.dumps(summary)


def test_write_dataset_generic(tmp_path: Path):
    samples = [{"latents": torch.randn(2, 1, 4, 4), "prompt_embeds": torch.randn(3, 5)} for _ in range(2)]
    root = write_dataset(tmp_path / "prepared", samples, source="prepare", extra={"model": "tiny"})
    ds = CalibrationDataset(root)
    assert torch.equal(ds[1]["latents"], samples[1]["latents"])
    assert ds.manifest["source"] == "prepare" and ds.manifest["model"] == "tiny"
    with pytest.raises(OutputExistsError):
        write_dataset(root, samples, source="prepare")
    with pytest.raises(ValueError, match="differs"):
        write_dataset(tmp_path / "x", [samples[0], {"latents": torch.randn(2, 1, 4, 8),
                                                     "prompt_embeds": torch.randn(3, 5)}], source="prepare")


# ---------------------------------------------------------------------------- writer refusals


def test_writer_is_idempotent_and_refuses_other_content(tmp_path: Path):
    root = _write(tmp_path / "data")
    before = _files(root)
    assert _write(root) == root and _files(root) == before  # same parameters: left as is
    with pytest.raises(OutputExistsError, match="not empty"):
        _write(root, seed=2)
    with pytest.raises(OutputExistsError, match="not empty"):
        _write(root, num_samples=4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        _write(other)
    assert (other / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        _write(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CalibrationDataset(_write(empty)).latent_shape == (4, 3, 8, 12)
    # No temp directories left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_writer_refuses_damaged_copy_of_same_dataset(tmp_path: Path):
    root = _write(tmp_path / "data")
    (root / "sample_00001.safetensors").unlink()
    with pytest.raises(OutputExistsError, match="damaged"):
        _write(root)


def test_writer_bad_arguments(tmp_path: Path):
    with pytest.raises(UsageError, match="height"):
        _write(tmp_path / "x", height=0)
    with pytest.raises(UsageError, match="dtype"):
        _write(tmp_path / "x", dtype=torch.int8)
    with pytest.raises(UsageError, match="image_len"):
        _write(tmp_path / "x", image_len=3)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- bad inputs


def test_missing_dir_and_manifest(tmp_path: Path):
    _bad(tmp_path / "nope", "data directory not found")
    (tmp_path / "f").write_text("x")
    _bad(tmp_path / "f", "not a directory")
    (tmp_path / "empty").mkdir()
    msg = _bad(tmp_path / "empty", "manifest not found")
    assert "dataset.json" in msg


@pytest.mark.parametrize("text, match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_corrupt_manifest(ds_dir: Path, text: str, match: str):
    (ds_dir / MANIFEST).write_text(text)
    assert "dataset.json" in _bad(ds_dir, match)


@pytest.mark.parametrize("change, match", [
    ({"format": "webdataset"}, "format is 'webdataset'"),
    ({"version": 2}, "unsupported dataset version 2"),
    ({"latent_shape": [4, 3, 8]}, "latent_shape must be a list of 4"),
    ({"text_shape": [10, 0]}, "text_shape must be a list of 2"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"dtype": ["float32"]}, "dtype must be one of"),
    ({"samples": "sample_00000.safetensors"}, "samples must be a list"),
    ({"num_samples": 0}, "num_samples must be a positive"),
    ({"num_samples": 5}, "num_samples is 5 but 3"),
    ({"samples": ["../x.safetensors"] * 1 + ["a.safetensors", "b.safetensors"]}, "plain"),
    ({"samples": ["a.safetensors", "a.safetensors", "b.safetensors"]}, "more than once"),
])
def test_bad_manifest_values(ds_dir: Path, change: dict, match: str):
    m = _manifest(ds_dir)
    m.update(change)
    _set_manifest(ds_dir, m)
    _bad(ds_dir, match)


@pytest.mark.parametrize("key", ["format", "samples", "latent_shape", "dtype"])
def test_manifest_missing_key(ds_dir: Path, key: str):
    m = _manifest(ds_dir)
    del m[key]
    _set_manifest(ds_dir, m)
    _bad(ds_dir, "format is None" if key == "format" else f"missing key.*{key}")


def test_missing_sample_file(ds_dir: Path):
    (ds_dir / "sample_00001.safetensors").unlink()
    msg = _bad(ds_dir, "sample_00001.safetensors: sample file listed in dataset.json is missing")
    assert str(ds_dir) in msg


def test_truncated_and_garbage_samples(ds_dir: Path):
    f = ds_dir / "sample_00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _bad(ds_dir, r"sample_00002.safetensors: not a readable safetensors file")
    f.write_bytes(b"")
    _bad(ds_dir, "sample_00002.safetensors: not a readable safetensors file")
    (ds_dir / "sample_00000.safetensors").write_bytes(b"\x00" * 3)
    _bad(ds_dir, r"sample_00000.*and 1 more bad sample")


def _replace_sample(root: Path, tensors: dict) -> None:
    save_file(tensors, str(root / "sample_00001.safetensors"))


@pytest.mark.parametrize("tensors, match", [
    ({"latents": torch.zeros(4, 3, 8, 12)}, "missing tensor 'prompt_embeds'"),
    ({"prompt_embeds": torch.zeros(10, 16)}, "missing tensor 'latents'"),
    ({"latents": torch.zeros(4, 3, 8, 11), "prompt_embeds": torch.zeros(10, 16)},
     r"'latents' has shape \[4, 3, 8, 11\] but dataset.json says latent_shape \[4, 3, 8, 12\]"),
    ({"latents": torch.zeros(4, 24, 12), "prompt_embeds": torch.zeros(10, 16)}, "'latents' must have rank 4"),
    ({"latents": torch.zeros(4, 3, 8, 12), "prompt_embeds": torch.zeros(1, 10, 16)},
     "'prompt_embeds' must have rank 2"),
    ({"latents": torch.zeros(4, 3, 8, 12), "prompt_embeds": torch.zeros(12, 16)}, "'prompt_embeds' has shape"),
    ({"latents": torch.zeros(4, 3, 8, 12, dtype=torch.int32), "prompt_embeds": torch.zeros(10, 16)},
     "'latents' has dtype I32"),
    ({"latents": torch.zeros(4, 3, 8, 12, dtype=torch.float64), "prompt_embeds": torch.zeros(10, 16)},
     "'latents' has dtype F64"),
    ({"latents": torch.zeros(4, 3, 8, 12), "prompt_embeds": torch.zeros(10, 16, dtype=torch.float16)},
     "'prompt_embeds' is float16 but dataset.json says dtype float32"),
    ({"latents": torch.zeros(4, 3, 8, 12), "prompt_embeds": torch.zeros(10, 16), "image_embeds": torch.zeros(2, 2)},
     "has image_embeds but dataset.json has no image_shape"),
])
def test_bad_sample_tensors(ds_dir: Path, tensors: dict, match: str):
    _replace_sample(ds_dir, tensors)
    assert "sample_00001.safetensors" in _bad(ds_dir, match)


def test_missing_image_embeds(tmp_path: Path):
    root = _write(tmp_path / "i2v", image_len=5, image_dim=8)
    _replace_sample(root, {"latents": torch.zeros(4, 3, 8, 12), "prompt_embeds": torch.zeros(10, 16)})
    _bad(root, "missing tensor 'image_embeds'")


def test_expected_model_dims(ds_dir: Path):
    _bad(ds_dir, r"latents have 4 channels but the model takes 36", expected_channels=36)
    _bad(ds_dir, r"prompt_embeds have width 16 but the model takes 4096", expected_text_dim=4096)


def test_nonfinite_values_fail_on_load(ds_dir: Path):
    lat = torch.zeros(4, 3, 8, 12)
    lat[0, 0, 0, 0] = float("nan")
    _replace_sample(ds_dir, {"latents": lat, "prompt_embeds": torch.zeros(10, 16)})
    ds = CalibrationDataset(ds_dir)
    with pytest.raises(InputError, match="sample_00001.safetensors: 'latents' contains NaN"):
        ds[1]


# A protocol-0 pickle that, if anything ever unpickled it, would call open(SENTINEL, "w").
def _evil_pickle(sentinel: Path) -> bytes:
    return b"cbuiltins\nopen\n(V" + str(sentinel).encode() + b"\nVw\ntR."


def test_pickles_are_never_loaded(ds_dir: Path, tmp_path: Path):
    sentinel = tmp_path / "PWNED"
    payload = _evil_pickle(sentinel)
    # 1. A .pt listed in the manifest is refused by name.
    (ds_dir / "sample_00001.pt").write_bytes(payload)
    m = _manifest(ds_dir)
    m["samples"][1] = "sample_00001.pt"
    _set_manifest(ds_dir, m)
    _bad(ds_dir, r"'sample_00001.pt' must be a plain '\*.safetensors'")
    # 2. A pickle disguised as .safetensors is rejected by the safetensors parser.
    m["samples"][1] = "sample_00001.safetensors"
    _set_manifest(ds_dir, m)
    (ds_dir / "sample_00001.safetensors").write_bytes(payload)
    _bad(ds_dir, "sample_00001.safetensors: not a readable safetensors file")
    # 3. A stray pickle that the manifest does not list is ignored.
    (ds_dir / "sample_00001.safetensors").unlink()
    (ds_dir / "sample_00001.pt").unlink()
    _write(ds_dir.parent / "fresh")
    (ds_dir.parent / "fresh" / "extra.pt").write_bytes(payload)
    assert len(CalibrationDataset(ds_dir.parent / "fresh")) == 3
    assert not sentinel.exists()
