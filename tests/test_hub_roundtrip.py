"""push -> download with the real huggingface_hub client -> slaconv.from_pretrained -> identical outputs,
and the Hub-facing commands (convert from a Hub id, inspect a repo) against the loopback fake Hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import slaconv
from helpers import run, write_recipe
from hubfake import use_as_default_endpoint
from slaconv.checksums import verify_checksums
from slaconv.cli import main


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 2, 18, 22, generator=g), timestep=torch.tensor([611.0]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=g), return_dict=False)


def test_push_download_load_identical_outputs(fake_hub, tmp_path, tiny_wan_dir, monkeypatch):
    use_as_default_endpoint(monkeypatch, fake_hub)
    monkeypatch.setenv("HF_TOKEN", fake_hub.test_token)
    work, data = tmp_path / "w", tmp_path / "d"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml"))
    run("synth-data", data, "--model", work, "--num-samples", 2)
    run("calibrate", work, "--data", data)
    run("validate", work, "--data", data)

    res = CliRunner().invoke(main, ["-q", "push", str(work), "--repo-id", "acme/tiny-sla2", "--json"])
    assert res.exit_code == 0, res.output
    assert fake_hub.test_token not in res.output
    pushed = json.loads(res.stdout)
    uploaded = set(fake_hub.files("acme/tiny-sla2"))
    assert {"sla2.safetensors", "sla2_config.json", "README.md", "checksums.sha256", "config.json"} <= uploaded
    assert not any(f.startswith(("checkpoints/", "logs/")) for f in uploaded)
    assert "local.json" not in uploaded  # machine-local absolute paths are never published
    assert str(tmp_path) not in fake_hub.files("acme/tiny-sla2")["sla2_config.json"].decode()

    local = slaconv.from_pretrained(work)
    remote = slaconv.from_pretrained("acme/tiny-sla2")
    with torch.no_grad():
        assert torch.equal(local(**_inputs())[0], remote(**_inputs())[0])
    assert pushed["commit_url"].startswith(fake_hub.endpoint)

    info = json.loads(run("inspect", "acme/tiny-sla2", "--json").stdout)
    assert [x["layer"] for x in info["layers"]] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert info["validation"]["passed"] is True and info["validation_state"]["status"] == "current"


def test_downloaded_snapshot_verifies_checksums(fake_hub, tmp_path, tiny_wan_dir, monkeypatch):
    from huggingface_hub import snapshot_download

    use_as_default_endpoint(monkeypatch, fake_hub)
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml"))
    from slaconv.push import push

    push(work, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint, allow_unvalidated=True)
    snap = Path(snapshot_download("acme/m", token=fake_hub.test_token))
    verify_checksums(snap)


def test_convert_from_hub_id_and_unknown_repo(fake_hub, tmp_path, tiny_wan_dir, monkeypatch):
    use_as_default_endpoint(monkeypatch, fake_hub)
    files = {f"transformer/{p.name}": p.read_bytes() for p in tiny_wan_dir.iterdir()}
    fake_hub.add_repo("acme/tiny-wan", files=files)
    out = json.loads(run("convert", "acme/tiny-wan", "--subfolder", "transformer", "-o", tmp_path / "w",
                         "--recipe", write_recipe(tmp_path / "r.yaml"), "--json").stdout)
    cfg = json.loads((tmp_path / "w" / "sla2_config.json").read_text())
    assert cfg["base_model"]["id"] == "acme/tiny-wan" and cfg["base_model"]["subfolder"] == "transformer"
    assert len(cfg["base_model"]["revision"]) == 40 and out["layers"]
    res = CliRunner().invoke(main, ["-q", "convert", "acme/does-not-exist", "-o", str(tmp_path / "x")])
    assert res.exit_code == 3 and "not found" in res.stderr
