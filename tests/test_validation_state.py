"""A validation is bound to the weights it measured: after any change to the SLA2 state, the diffusers weights or
the SLA2 settings it is stale, and inspect, push and the model card say so instead of repeating its verdict."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import slaconv
from helpers import fails, run, write_recipe
from hubfake import use_as_default_endpoint
from slaconv.errors import EXIT_DIVERGED, EXIT_GATE, EXIT_UNVALIDATED
from slaconv.modelcard import build_model_card
from slaconv.validation_state import validation_state
from slaconv.workdir import WorkDir


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_wan_dir):
    """A converted and validated tiny Wan work dir (and its data), built once for this module."""
    root = tmp_path_factory.mktemp("validated")
    work, data = root / "work", root / "data"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(root / "r.yaml"))
    run("synth-data", data, "--model", work, "--num-samples", 2)
    run("validate", work, "--data", data)
    return work, data


@pytest.fixture
def work(validated, tmp_path):
    """A private copy of the validated work dir."""
    src, data = validated
    dst = tmp_path / "work"
    shutil.copytree(src, dst)
    return dst, data


def _state(work) -> dict:
    return json.loads(run("inspect", work, "--json").stdout)["validation_state"]


def _dry_card(work, *flags) -> str:
    return json.loads(run("push", work, "--repo-id", "me/m", "--dry-run", "--json", *flags).stdout)["card_text"]


def test_a_fresh_validation_is_current_and_recorded_in_report_and_config(work):
    work, _ = work
    digest = WorkDir(work).weights_digest()
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    report = WorkDir(work).read_validation_report()
    assert report["weights"]["digest"] == digest
    assert set(report["weights"]["files"]) == {"config.json", "diffusion_pytorch_model.safetensors",
                                               "sla2.safetensors"}
    assert WorkDir(work).read_sla2_config().validation["weights_digest"] == digest
    assert _state(work)["status"] == "current"
    assert "passed (current: measured these weights)" in run("inspect", work).stdout
    card = _dry_card(work)
    assert "all quality gates **passed**" in card
    assert ModelCard(card).data.eval_results  # the metrics this validation measured


def test_recalibrating_makes_the_validation_stale_and_push_refuses_it(work, tmp_path):
    work, data = work
    # a run that makes the model worse is refused and leaves the validated weights in place
    run("calibrate", work, "--data", data, "--stage", "2", "--lr", "1.0", code=EXIT_DIVERGED)
    assert _state(work)["status"] == "current"
    # with the divergence guard opened wide, the same run saves the ruined weights
    reckless = write_recipe(tmp_path / "reckless.yaml", **{"calibration.heldout_tolerance": 1e12,
                                                           "calibration.divergence_factor": 1e12})
    run("calibrate", work, "--data", data, "--stage", "2", "--lr", "1.0", "--recipe", reckless, "--overwrite")
    state = _state(work)
    assert state["status"] == "stale" and "diffusion_pytorch_model.safetensors" in state["detail"]
    assert "stale (weights changed since validation)" in run("inspect", work).stdout
    fails(EXIT_UNVALIDATED, "push", work, "--repo-id", "me/m", "--dry-run", match="--allow-unvalidated")
    card = _dry_card(work, "--allow-unvalidated")
    assert "not validated" in card and "passed" not in card.lower()
    assert ModelCard(card).data.eval_results is None  # no metric of other weights in the card's metadata
    run("validate", work, "--data", data, code=EXIT_GATE)  # the ruined weights fail the default gates
    assert _state(work)["status"] == "current"
    fails(EXIT_GATE, "push", work, "--repo-id", "me/m", "--dry-run", match="--allow-failed-validation")
    assert "FAILED" in _dry_card(work, "--allow-failed-validation")


def test_every_measured_file_and_setting_counts_and_only_content_matters(work):
    work, _ = work
    wd = WorkDir(work)
    original = wd.sla2_state_path.read_bytes()
    state = load_file(str(wd.sla2_state_path))
    state["blocks.0.attn1.router_q"] = torch.randn_like(state["blocks.0.attn1.router_q"])
    save_file(state, str(wd.sla2_state_path), metadata={"format": "slaconv-sla2"})
    now = validation_state(wd)
    assert now.status == "stale" and "sla2.safetensors" in now.detail and not now.earned
    wd.sla2_state_path.write_bytes(original)  # the same bytes again, with a new mtime: current again
    assert validation_state(wd).status == "current"

    config = json.loads(wd.sla2_config_path.read_text())
    config["topk"] = 0.5
    wd.sla2_config_path.write_text(json.dumps(config))
    now = validation_state(wd)
    assert now.status == "stale" and "topk" in now.detail


def test_validating_in_another_low_bit_mode_does_not_validate_the_stored_one(work):
    work, data = work
    run("validate", work, "--data", data, "--quant", "none")
    now = validation_state(WorkDir(work))
    assert now.status == "stale" and "quant" in now.detail
    fails(EXIT_UNVALIDATED, "push", work, "--repo-id", "me/m", "--dry-run", match="quant")


def test_a_model_never_validated_is_refused_and_its_card_says_so(tmp_path, tiny_wan_dir):
    work = tmp_path / "w"
    run("convert", tiny_wan_dir, "-o", work, "--recipe", write_recipe(tmp_path / "r.yaml"))
    assert _state(work)["status"] == "none"
    assert "validation: not validated" in run("inspect", work).stdout
    fails(EXIT_UNVALIDATED, "push", work, "--repo-id", "me/m", "--dry-run", match="not been validated")
    card = _dry_card(work, "--allow-unvalidated")
    assert "not validated" in card and "passed" not in card.lower()


def test_a_validation_from_an_earlier_slaconv_loads_but_counts_as_unknown(work):
    """Earlier versions recorded no digest: the work dir loads as before, but nothing says which weights the
    validation measured, so push treats it as missing and the card claims nothing."""
    work, _ = work
    wd = WorkDir(work)
    before = slaconv.from_pretrained(work).state_dict()
    report = wd.read_validation_report()
    del report["weights"]
    wd.validation_report_path.write_text(json.dumps(report))
    config = json.loads(wd.sla2_config_path.read_text())
    del config["validation"]["weights_digest"]
    wd.sla2_config_path.write_text(json.dumps(config))

    after = slaconv.from_pretrained(work).state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items())
    state = _state(work)
    assert state["status"] == "unknown" and "earlier slaconv" in state["detail"]
    fails(EXIT_UNVALIDATED, "push", work, "--repo-id", "me/m", "--dry-run", match="earlier slaconv")
    card = build_model_card(work)
    assert "not validated" in card and "passed" not in card.lower()


def test_a_pushed_repo_is_checked_against_its_checksums_without_downloading_weights(fake_hub, work, monkeypatch):
    work, data = work
    use_as_default_endpoint(monkeypatch, fake_hub)
    monkeypatch.setenv("HF_TOKEN", fake_hub.test_token)
    run("push", work, "--repo-id", "acme/fresh")
    info = json.loads(run("inspect", "acme/fresh", "--json").stdout)
    assert info["validation_state"]["status"] == "current"

    run("calibrate", work, "--data", data, "--stage", "1")  # new router weights, pushed anyway
    run("push", work, "--repo-id", "acme/stale", "--allow-unvalidated")
    info = json.loads(run("inspect", "acme/stale", "--json").stdout)
    assert info["validation_state"]["status"] == "stale" and "sla2.safetensors" in info["validation_state"]["detail"]
    assert "passed" not in fake_hub.files("acme/stale")["README.md"].decode().lower()
