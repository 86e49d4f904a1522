"""``slaconv validate``: the baselines it measures beside the model, and default gates that tell a working model
from a broken one."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import run, write_recipe
from slaconv.demo import validation_rows
from slaconv.errors import EXIT_GATE
from slaconv.quality.workdirs import PIN, edit_sla2_state
from slaconv.validate import PSNR_IDENTICAL
from slaconv.workdir import WorkDir

SAME = ("attention_rel_l2_mean", "attention_cosine_mean", "velocity_rel_l2_mean", "sample_rel_l2", "sample_psnr_db",
        "sparsity_mean")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_wan_dir):
    """A convert-only tiny Wan work dir (synthetic alpha pass, no data), built once for this module."""
    root = tmp_path_factory.mktemp("converted")
    recipe = write_recipe(root / "r.yaml")
    run("convert", tiny_wan_dir, "-o", root / "work", "--recipe", recipe)
    return root / "work", recipe


@pytest.fixture
def work(converted, tmp_path):
    src, recipe = converted
    shutil.copytree(src, tmp_path / "work")
    return tmp_path / "work", recipe


def _validate(work, code=0, *args) -> dict:
    run("validate", work, *args, code=code)
    return WorkDir(work).read_validation_report()


def test_a_convert_only_model_sits_exactly_on_its_convert_only_baseline(work):
    """The convert-only baseline rebuilds the original with SLA2 as convert left it: for a convert-only work dir
    that is the model itself, figure for figure; the dense baseline is then the original itself: no error."""
    work, _ = work
    report = _validate(work)
    baseline, dense = report["baselines"]["convert_only"], report["baselines"]["dense"]
    assert baseline["alpha"] == "recorded at convert"
    for key in SAME:
        assert baseline[key] == report["summary"][key], key
    assert report["summary"]["attention_rel_l2_mean"] > 0.01  # a real approximation, not a trivial one
    assert dense["velocity_rel_l2_mean"] <= 1e-6 and dense["sample_psnr_db"] == PSNR_IDENTICAL
    markdown = WorkDir(work).validation_markdown_path.read_text()
    assert "| metric | this model | dense (full attention) | convert only | gate |" in markdown
    assert f"{report['summary']['velocity_rel_l2_mean']:.4f} | 0.0000 | " in markdown

    rows = "\n".join(validation_rows(report))  # the demo's table shows each figure beside its baselines
    s = report["summary"]
    assert f"{s['sample_psnr_db']:.2f} / {baseline['sample_psnr_db']:.2f} / {PSNR_IDENTICAL:.2f}" in rows
    assert f"{s['velocity_rel_l2_mean']:.4f} / {baseline['velocity_rel_l2_mean']:.4f} / 0.0000" in rows
    assert "99: identical" in rows


def test_a_work_dir_converted_before_alpha_was_recorded_re_measures_it_as_convert_did(work):
    work, _ = work
    config = json.loads(WorkDir(work).sla2_config_path.read_text())
    del config["alpha_init"]["initial_alpha_logit"]
    WorkDir(work).sla2_config_path.write_text(json.dumps(config))
    report = _validate(work)
    baseline = report["baselines"]["convert_only"]
    assert baseline["alpha"] == "re-measured (not recorded at convert)"
    for key in SAME:  # the same synthetic pass, seed and settings as convert's: the same alpha to the last bit
        assert baseline[key] == report["summary"][key], key


def test_default_gates_pass_the_dense_control_and_fail_a_broken_mix(work, tmp_path, tiny_wan_dir):
    """The dense control (every block exact, alpha pinned to 1, no low-bit mode) is full attention through the
    SLA2 path: ~0 error, and the default gates pass it.  Forcing alpha to 0 (the linear branch alone) makes the
    model worse than not calibrating at all, which the default gates refuse."""
    dense = tmp_path / "dense"
    run("convert", tiny_wan_dir, "-o", dense, "--recipe", work[1], "--topk", "1.0", "--quant", "none")
    edit_sla2_state(dense, alpha_logit=PIN)
    report = _validate(dense)
    s = report["summary"]
    assert s["attention_rel_l2_mean"] < 1e-5 and s["velocity_rel_l2_mean"] < 1e-5 and s["sparsity_mean"] == 0
    assert s["sample_psnr_db"] == PSNR_IDENTICAL  # float rounding only: at the ceiling
    assert all(g["passed"] for g in report["gates"].values())

    work, _ = work
    edit_sla2_state(work, alpha_logit=-PIN)
    report = _validate(work, EXIT_GATE)
    assert report["gates"]["velocity_vs_convert_only_max"]["passed"] is False
    assert report["summary"]["velocity_vs_convert_only"] > 1.0
