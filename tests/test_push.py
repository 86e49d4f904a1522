"""`slaconv push` against the loopback fake Hub, with the real huggingface_hub client both ways."""

from __future__ import annotations

import ast
import json
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import save_file

from hubfake import isolate_hf_env, use_as_default_endpoint
from slaconv.checksums import CHECKSUMS_FILE, read_checksums, verify_checksums, write_checksums
from slaconv.errors import EXIT_HUB, HubError, InputError, UsageError
from slaconv.modelcard import CARD_MARKER, build_model_card
from slaconv.push import push
from slaconv.workdir import WorkDir

BASE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def make_workdir(root: Path, *, sharded: bool = False, validation: dict | None | bool = True) -> Path:
    """A tiny but well-formed slaconv work dir (2 layers, 2 heads, head dim 4)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 2,
                                                  "num_attention_heads": 2, "attention_head_dim": 4}))
    g = torch.Generator().manual_seed(0)
    weights = {f"blocks.{i}.attn1.to_q.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    if sharded:
        names = {k: f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors" for i, k in enumerate(weights)}
        for key, name in names.items():
            save_file({key: weights[key]}, root / name, metadata={"format": "pt"})
        index = {"metadata": {"total_size": 2 * 8 * 8 * 4}, "weight_map": names}
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(weights, root / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    layers = [f"blocks.{i}.attn1" for i in range(2)]
    sla2 = {}
    for layer in layers:
        sla2[f"{layer}.router_q"] = torch.eye(4).repeat(2, 1, 1)
        sla2[f"{layer}.router_k"] = torch.eye(4).repeat(2, 1, 1)
        sla2[f"{layer}.alpha_logit"] = torch.zeros(2)
    save_file(sla2, root / "sla2.safetensors")
    summary = {"attention_rel_l2_mean": 0.031, "velocity_rel_l2_mean": 0.012, "sample_psnr_db": 33.5,
               "sparsity_mean": 0.949}
    (root / "sla2_config.json").write_text(json.dumps({
        "format": "slaconv-sla2", "format_version": 1, "slaconv_version": "0.1.0",
        "base_model": {"id": BASE, "revision": "0" * 40, "content_hash": "sha256:" + "ab" * 32},
        "block_q": 128, "block_k": 64, "topk": 0.05, "topk_per_layer": {layers[0]: 0.05, layers[1]: 0.1},
        "feature_map": "softmax", "quant": "int8-fp8", "alpha_granularity": "head", "layers": layers,
        "recipe_hash": "c0ffee", "calibration": {"stage1_steps": 10, "stage2_steps": 0},
        "validation": None,
    }))
    (root / "recipe.yaml").write_text("model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers\ntopk: 0.05\n")
    if validation:  # bound to these weights, as `slaconv validate` records it
        work = WorkDir(root)
        measured = {"digest": work.weights_digest(), "files": work.file_hashes(), "settings": work.measured_settings()}
        report = dict(validation) if isinstance(validation, dict) else {"passed": True, "summary": summary}
        report["weights"] = measured
        work.update_sla2_config(validation={"passed": report["passed"], **report["summary"],
                                            "weights_digest": measured["digest"]})
        (root / "reports").mkdir(exist_ok=True)
        (root / "reports" / "validation.json").write_text(json.dumps(report))
        (root / "reports" / "validation.md").write_text("# validation\n")
        (root / "reports" / "attention_error.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    (root / "checkpoints" / "stage1-step10").mkdir(parents=True)
    (root / "checkpoints" / "stage1-step10" / "state.safetensors").write_bytes(b"not for upload")
    (root / "logs").mkdir()
    (root / "logs" / "train.log").write_text("step 1 loss 0.1\n")
    return root


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path / "wd")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- round trip
def test_push_download_roundtrip(fake_hub, workdir, tmp_path, capsys):
    token = fake_hub.test_token
    result = push(workdir, "acme/wan-sla2", token=token, endpoint=fake_hub.endpoint)

    assert result["repo_id"] == "acme/wan-sla2" and result["revision"] == "main"
    assert result["commit_url"].startswith(f"{fake_hub.endpoint}/acme/wan-sla2/commit/")
    assert result["pr_url"] is None and result["card"] == "generated"
    assert set(result["files"]) == {
        "README.md", CHECKSUMS_FILE, "config.json", "diffusion_pytorch_model.safetensors", "sla2.safetensors",
        "sla2_config.json", "recipe.yaml", "reports/validation.json", "reports/validation.md",
        "reports/attention_error.png",
    }
    remote = fake_hub.files("acme/wan-sla2")
    assert set(remote) == set(result["files"]) | {".gitattributes"}
    assert not any(p.startswith(("checkpoints/", "logs/")) for p in remote)

    snap = Path(snapshot_download("acme/wan-sla2", endpoint=fake_hub.endpoint, token=token,
                                  cache_dir=tmp_path / "cache"))
    local = _files(workdir)
    for rel in result["files"]:
        assert (snap / rel).read_bytes() == local[rel], rel
    verify_checksums(snap)
    assert set(read_checksums(snap)) == set(result["files"]) - {CHECKSUMS_FILE}

    card = ModelCard((snap / "README.md").read_text(encoding="utf-8"))
    assert card.data.base_model == BASE
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-video"
    assert {"sla2", "sparse-attention", "slaconv", "wan"} <= set(card.data.tags)
    psnr = [r for r in card.data.eval_results if r.metric_type == "sample_psnr_db"]
    assert psnr and psnr[0].metric_value == pytest.approx(33.5)
    assert 'slaconv.from_pretrained("acme/wan-sla2",' in card.text
    assert fake_hub.validated_yaml, "README upload must go through /api/validate-yaml"

    # the token reached the Hub API, never the CDN, and nothing printed or returned it
    api_calls = [r for r in fake_hub.requests if r.server == "hub"]
    assert api_calls and all(r.authorization == f"Bearer {token}" for r in api_calls)
    cdn_calls = [r for r in fake_hub.requests if r.server == "cdn"]
    assert cdn_calls and all(r.authorization is None for r in cdn_calls)
    out = capsys.readouterr()
    assert token not in out.out + out.err
    assert token not in json.dumps(result)


def test_push_writes_only_card_and_checksums(fake_hub, workdir):
    before = _files(workdir)
    push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    after = _files(workdir)
    assert set(after) - set(before) == {"README.md", CHECKSUMS_FILE}
    assert all(after[k] == v for k, v in before.items())
    verify_checksums(workdir)
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_repush_unchanged_makes_no_commit(fake_hub, workdir):
    first = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    n_commits = len(fake_hub.repo("acme/m").commits)
    second = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    assert second["commit_oid"] == first["commit_oid"]
    assert len(fake_hub.repo("acme/m").commits) == n_commits


def test_repush_sharded_removes_stale_weights(fake_hub, tmp_path):
    token, ep = fake_hub.test_token, fake_hub.endpoint
    push(make_workdir(tmp_path / "a", sharded=True), "acme/m", token=token, endpoint=ep)
    remote = fake_hub.files("acme/m")
    assert "diffusion_pytorch_model.safetensors.index.json" in remote
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in remote

    result = push(make_workdir(tmp_path / "b", validation=None), "acme/m", token=token, endpoint=ep,
                  allow_unvalidated=True)
    remote = fake_hub.files("acme/m")
    assert "diffusion_pytorch_model.safetensors" in remote
    assert not [p for p in remote if p.startswith("diffusion_pytorch_model-") or p.endswith(".index.json")]
    assert not [p for p in remote if p.startswith("reports/")]
    assert set(remote) == set(result["files"]) | {".gitattributes"}


def test_create_pr(fake_hub, workdir, tmp_path):
    token, ep = fake_hub.test_token, fake_hub.endpoint
    fake_hub.add_repo("acme/m", files={"README.md": b"# old\n"})
    result = push(workdir, "acme/m", token=token, endpoint=ep, create_pr=True, commit_message="SLA2 conversion")
    assert result["pr_url"] == f"{ep}/acme/m/discussions/1"
    assert result["revision"] == "refs/pr/1"
    assert fake_hub.files("acme/m", "main")["README.md"] == b"# old\n"  # main untouched
    assert fake_hub.repo("acme/m").prs[1].is_pull_request
    snap = Path(snapshot_download("acme/m", revision="refs/pr/1", endpoint=ep, token=token,
                                  cache_dir=tmp_path / "cache"))
    verify_checksums(snap)
    assert (snap / "sla2.safetensors").read_bytes() == (workdir / "sla2.safetensors").read_bytes()

    # resuming into the same PR: push to its ref, no second PR is opened
    (workdir / "recipe.yaml").write_text("topk: 0.1\n")
    again = push(workdir, "acme/m", token=token, endpoint=ep, revision="refs/pr/1")
    assert again["pr_url"] is None and len(fake_hub.repo("acme/m").prs) == 1
    assert fake_hub.files("acme/m", "refs/pr/1")["recipe.yaml"] == b"topk: 0.1\n"


def test_revision_creates_branch(fake_hub, workdir):
    result = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint, revision="sla2-v1")
    assert result["revision"] == "sla2-v1"
    assert "sla2.safetensors" in fake_hub.files("acme/m", "sla2-v1")
    assert set(fake_hub.files("acme/m", "main")) == {".gitattributes"}
    # pushing again to the now-existing branch works too
    push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint, revision="sla2-v1")


def test_private(fake_hub, workdir, tmp_path):
    token, ep = fake_hub.test_token, fake_hub.endpoint
    push(workdir, "acme/secret", token=token, endpoint=ep, private=True)
    assert fake_hub.repo("acme/secret").private
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/secret", endpoint=ep, token=False, cache_dir=tmp_path / "anon")
    snap = snapshot_download("acme/secret", endpoint=ep, token=token, cache_dir=tmp_path / "auth")
    verify_checksums(snap)

    fake_hub.add_repo("acme/public")
    with pytest.raises(HubError, match="public"):
        push(workdir, "acme/public", token=token, endpoint=ep, private=True)
    assert set(fake_hub.files("acme/public")) == {".gitattributes"}


def test_user_written_readme_is_kept(fake_hub, workdir):
    text = "---\nlicense: apache-2.0\n---\n# my own card\n"
    (workdir / "README.md").write_text(text)
    result = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    assert result["card"] == "user"
    assert fake_hub.files("acme/m")["README.md"] == text.encode()


def test_repo_id_without_namespace(fake_hub, workdir):
    result = push(workdir, "wan-sla2", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    assert result["repo_id"] == "user/wan-sla2"  # the token's user, as the Hub resolves it
    assert 'slaconv.from_pretrained("user/wan-sla2",' in fake_hub.files("user/wan-sla2")["README.md"].decode()


def test_token_from_env(fake_hub, workdir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.test_token)
    push(workdir, "acme/m", endpoint=fake_hub.endpoint)
    assert fake_hub.requests[0].authorization == f"Bearer {fake_hub.test_token}"


def test_default_endpoint_helper(fake_hub, workdir, monkeypatch, tmp_path):
    """Code that passes no endpoint (diffusers, slaconv.from_pretrained) reaches the fake too."""
    from huggingface_hub import hf_hub_download, model_info

    use_as_default_endpoint(monkeypatch, fake_hub)
    monkeypatch.setenv("HF_TOKEN", fake_hub.test_token)
    push(workdir, "acme/m")
    assert model_info("acme/m").card_data.library_name == "diffusers"
    path = Path(hf_hub_download("acme/m", "sla2.safetensors"))
    assert path.read_bytes() == (workdir / "sla2.safetensors").read_bytes()
    assert tmp_path in path.parents  # the fixture keeps the download cache out of ~/.cache


# ----------------------------------------------------------------------------- no network
def test_dry_run_makes_no_request_and_writes_nothing(fake_hub, workdir):
    before = _files(workdir)
    result = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint, dry_run=True)
    assert fake_hub.requests == []
    assert _files(workdir) == before
    assert result["dry_run"] and "sla2.safetensors" in result["files"] and "README.md" in result["files"]
    assert ModelCard(result["card_text"]).data.library_name == "diffusers"


def test_offline_refuses(fake_hub, workdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline") as info:
        push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    assert info.value.exit_code == EXIT_HUB
    assert fake_hub.requests == []
    assert push(workdir, "acme/m", endpoint=fake_hub.endpoint, dry_run=True)["dry_run"]  # dry run still works


# ----------------------------------------------------------------------------- failures
def _one_line_without(err: HubError, secret: str) -> str:
    msg = str(err)
    assert "\n" not in msg and secret not in msg and secret not in repr(err)
    return msg


def test_wrong_token_is_401(fake_hub, workdir):
    bad = "hf_wrongtoken987654321"
    with pytest.raises(HubError) as info:
        push(workdir, "acme/m", token=bad, endpoint=fake_hub.endpoint)
    msg = _one_line_without(info.value, bad)
    assert "401" in msg and "invalid or expired" in msg
    assert info.value.exit_code == EXIT_HUB
    assert any(r.authorization == f"Bearer {bad}" for r in fake_hub.requests)  # it did reach the server


def test_no_token_hints_login(fake_hub, workdir):
    with pytest.raises(HubError) as info:
        push(workdir, "acme/m", endpoint=fake_hub.endpoint)
    assert "401" in str(info.value) and "HF_TOKEN" in str(info.value)


@pytest.mark.parametrize("status,where", [(500, "repos/create"), (403, "preupload"), (401, "commit")])
def test_server_errors_become_one_line_hub_errors(fake_hub, workdir, status, where):
    token = fake_hub.test_token
    fake_hub.inject(status, path=where)
    with pytest.raises(HubError) as info:
        push(workdir, "acme/m", token=token, endpoint=fake_hub.endpoint)
    assert str(status) in _one_line_without(info.value, token)
    if where == "repos/create":  # failed before anything was written
        assert not (workdir / "README.md").exists() and not (workdir / CHECKSUMS_FILE).exists()


def test_unreachable_endpoint(tmp_path, monkeypatch, workdir):
    isolate_hf_env(monkeypatch, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match="cannot reach"):
        push(workdir, "acme/m", token="hf_unusedtoken12345", endpoint=f"http://127.0.0.1:{port}")


def test_bad_workdir(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        push(tmp_path / "nope", "acme/m", dry_run=True)
    wd = make_workdir(tmp_path / "wd")
    (wd / "sla2.safetensors").unlink()
    with pytest.raises(InputError, match="sla2.safetensors"):
        push(wd, "acme/m", dry_run=True)
    wd = make_workdir(tmp_path / "wd2")
    (wd / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no diffusers weights"):
        push(wd, "acme/m", dry_run=True)
    wd = make_workdir(tmp_path / "wd3", sharded=True)
    (wd / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="00002-of-00002"):
        push(wd, "acme/m", dry_run=True)


def test_corrupt_or_incomplete_safetensors(tmp_path):
    wd = make_workdir(tmp_path / "wd")
    data = (wd / "diffusion_pytorch_model.safetensors").read_bytes()
    (wd / "diffusion_pytorch_model.safetensors").write_bytes(data[:-5])  # truncated copy
    with pytest.raises(InputError, match="not a complete safetensors file"):
        push(wd, "acme/m", dry_run=True)
    wd = make_workdir(tmp_path / "wd2")
    (wd / "sla2.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="sla2.safetensors"):
        push(wd, "acme/m", dry_run=True)
    wd = make_workdir(tmp_path / "wd3")
    cfg = json.loads((wd / "sla2_config.json").read_text())
    cfg["layers"].append("blocks.9.attn1")
    (wd / "sla2_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="blocks.9.attn1.router_q"):
        push(wd, "acme/m", dry_run=True)


def test_bad_arguments(workdir):
    with pytest.raises(UsageError):
        push(workdir, "not a repo id!", dry_run=True)
    with pytest.raises(UsageError):
        push(workdir, "acme/m", create_pr=True, revision="dev", dry_run=True)


# ----------------------------------------------------------------------------- checksums + card units
def test_checksums_detect_corruption(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.bin").write_bytes(b"bbb")
    (tmp_path / "sub" / "a.txt").write_text("aaa")
    manifest = write_checksums(tmp_path, ["sub/a.txt", "b.bin"])
    lines = manifest.read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["b.bin", "sub/a.txt"]
    assert all(len(line.split("  ")[0]) == 64 for line in lines)
    verify_checksums(tmp_path)
    (tmp_path / "sub" / "a.txt").write_text("aab")
    with pytest.raises(InputError, match="sub/a.txt"):
        verify_checksums(tmp_path)
    (tmp_path / "sub" / "a.txt").write_text("aaa")
    (tmp_path / "b.bin").unlink()
    with pytest.raises(InputError, match="b.bin is missing"):
        verify_checksums(tmp_path)
    manifest.write_text("0" * 64 + "  ../etc/passwd\n")
    with pytest.raises(InputError, match="outside"):
        verify_checksums(tmp_path)


def test_card_without_validation_and_local_base(tmp_path):
    wd = make_workdir(tmp_path / "wd", validation=None)
    cfg = json.loads((wd / "sla2_config.json").read_text())
    cfg["base_model"]["id"] = "/data/models/wan"
    cfg["topk_per_layer"] = {}
    (wd / "sla2_config.json").write_text(json.dumps(cfg))
    card = ModelCard(build_model_card(wd))
    assert card.data.base_model is None and card.data.eval_results is None
    assert "is **not validated**" in card.text and CARD_MARKER in card.text
    assert 'slaconv.from_pretrained("ORG/NAME",' in card.text


def _transformer_dtype(text: str) -> str | None:
    """The ``torch_dtype`` the first Python snippet in ``text`` loads its ``transformer`` in (None: not given)."""
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["transformer"]:
            return next((ast.unparse(k.value) for k in node.value.keywords if k.arg == "torch_dtype"), None)
    raise AssertionError("no transformer = ... in the snippet")


def test_loading_snippets_put_the_transformer_in_the_pipelines_dtype(tmp_path):
    """A transformer passed to a pipeline keeps its own dtype: the snippet must load it in bf16 itself."""
    card = build_model_card(make_workdir(tmp_path / "wd"))
    assert _transformer_dtype(card) == "torch.bfloat16"
    assert "torch_dtype=torch.bfloat16" in card.split("transformer=transformer", 1)[1].split("\n", 1)[0]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert _transformer_dtype(readme.split("### Python", 1)[1]) == "torch.bfloat16"


def test_card_failed_validation_and_odd_values(tmp_path):
    report = {"passed": False, "summary": {"sample_psnr_db": float("nan"), "velocity_rel_l2_mean": 0.4,
                                           "per_layer": [1, 2], "note": "a|b"}}
    wd = make_workdir(tmp_path / "wd", validation=report)
    card = ModelCard(build_model_card(wd, repo_id="acme/m"))
    assert "FAILED" in card.text
    assert [r.metric_type for r in card.data.eval_results] == ["velocity_rel_l2_mean"]
    assert "a\\|b" in card.text


def test_push_refuses_weights_no_current_validation_measured(fake_hub, workdir):
    """The library refuses as the CLI does: changed weights make the validation stale (exit 9), and the card of
    a push that is allowed anyway makes no claim for them."""
    from slaconv.errors import EXIT_GATE, EXIT_UNVALIDATED, QualityGateError, UnvalidatedError

    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(8, 8)}, workdir / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UnvalidatedError, match="stale.*diffusion_pytorch_model.safetensors") as caught:
        push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint)
    assert caught.value.exit_code == EXIT_UNVALIDATED and "acme/m" not in fake_hub.repos
    result = push(workdir, "acme/m", token=fake_hub.test_token, endpoint=fake_hub.endpoint, allow_unvalidated=True)
    card = ModelCard(fake_hub.files("acme/m")["README.md"].decode())
    assert result["validation"]["status"] == "stale" and card.data.eval_results is None
    assert "is **not validated**" in card.text and "passed" not in card.text

    failed = make_workdir(workdir.parent / "failed", validation={"passed": False, "summary": {"sample_psnr_db": 3.0}})
    with pytest.raises(QualityGateError) as caught:
        push(failed, "acme/f", dry_run=True)
    assert caught.value.exit_code == EXIT_GATE
    assert "FAILED" in push(failed, "acme/f", dry_run=True, allow_failed_validation=True)["card_text"]
