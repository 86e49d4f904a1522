"""The candidate comparison (slaconv.quality.candidates) end to end at smoke size on the CPU."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from slaconv.errors import UsageError
from slaconv.quality import candidate_merge, candidates, common, metrics
from slaconv.quality import synthvideo as sv
from slaconv.quality.candidate_row import heldout_digest
from slaconv.quality.tail_report import paired_bootstrap


@pytest.fixture(scope="module")
def smoke_original(tmp_path_factory):
    """An untrained smoke-size DiT with the training summary and a judge of the same videos."""
    root = tmp_path_factory.mktemp("original")
    common.build_model(common.SMOKE_MODEL_CONFIG).save_pretrained(root / "model")
    (root / "train_summary.json").write_text(json.dumps({"spec": sv.SMOKE_SPEC.to_dict(),
                                                         "settings": {"cond_dropout": 0.1}}))
    metrics.save_classifier(metrics.FrameClassifier(), root / "clf", {"summary": {"spec": sv.SMOKE_SPEC.to_dict()}})
    return root


def test_comparison_end_to_end(smoke_original, tmp_path):
    out = tmp_path / "cmp"
    extra = candidates.parse_definition("slow-router:calibration.stage1.lr=1e-5")
    unknown = candidates.parse_definition("tail-sampler:sla2.tail_sampler=pooled")
    res = candidates.run(smoke_original / "model", out, classifier_dir=smoke_original / "clf", smoke=True,
                         settings_override={"seeds": [0]},
                         names=["paper", "tail-sampler", "slow-router"], defined=[extra, unknown], device="cpu",
                         log=lambda *_: None)
    assert json.loads((out / "results.json").read_text())["skipped"] == res["skipped"]
    assert (out / "loss_vs_sparsity.png").stat().st_size > 0
    # a setting the installed schema rejects: skipped, and said so at the top of results.md
    assert "sla2.tail_sampler" in res["skipped"]["tail-sampler"]
    md = (out / "results.md").read_text()
    assert md.index("**Skipped candidates**") < md.index("## Held-out loss") and "**tail-sampler**" in md
    assert res["row_state"] == {"dense control/dense/s0": "done", "paper/90/s0": "done",
                                "slow-router/90/s0": "done"}

    # every row was scored on the original's triples, and its intervals pair those triples
    hs = metrics.heldout_set(sv.SMOKE_SPEC, res["settings"]["heldout_samples"])
    assert res["original"]["heldout_digest"] == heldout_digest(hs)
    base = torch.tensor(res["original"]["heldout_losses"], dtype=torch.float64)
    rows = {r["id"]: r for r in res["rows"]}
    control = torch.tensor(rows["dense control/dense/s0"]["heldout_losses"], dtype=torch.float64)
    for name in ("paper/90/s0", "slow-router/90/s0"):
        row = rows[name]
        assert row["same_triples"] and row["heldout_digest"] == heldout_digest(hs)
        est = torch.tensor(row["heldout_losses"], dtype=torch.float64)
        assert row["vs_original"] == paired_bootstrap(est, base)
        assert row["vs_control"] == paired_bootstrap(est, control)
        lo, hi = row["vs_original"]["ratio_ci"]
        assert lo <= row["vs_original"]["ratio"] <= hi
        assert row["samples"]["psnr"] is not None and 0 <= row["samples"]["accuracy"] <= 1
    assert "vs_control" not in rows["dense control/dense/s0"]
    assert rows["slow-router/90/s0"]["calibration"]["stage1"]["lr"] == 1e-5  # the override reached the CLI
    assert {(e["candidate"], e["topk"]) for e in res["summary"]} == {
        ("dense control", 1.0), ("paper", 0.10), ("slow-router", 0.10)}


def test_time_box_and_failures_are_reported(tmp_path):
    job = {"id": "broken/90/s0", "folder": str(tmp_path / "broken"), "slots": 1}
    state = candidates.run_jobs([job, {**job, "id": "later/90/s0", "folder": str(tmp_path / "later")}], 1,
                                time.monotonic() + 60, lambda *_: None)
    assert state["broken/90/s0"].startswith("failed: ") and state["later/90/s0"].startswith("failed: ")
    assert candidates.run_jobs([job], 1, time.monotonic() - 1, lambda *_: None) == {"broken/90/s0": "not started"}


def test_row_end_states_name_the_cause(tmp_path):
    log = tmp_path / "row.log"
    log.write_text("  $ slaconv convert ...  -> exit 0, 1.0 s\nerror: the recipe is invalid\n")
    assert candidates.end_state(0, log) == "done"
    assert candidates.end_state(2, log) == "failed: exit 2: error: the recipe is invalid"
    assert candidates.end_state(-9, log) == "failed: killed by signal 9 (out of memory?)"
    assert candidates.end_state(-15, tmp_path / "missing.log") == "failed: killed by signal 15"
    env = candidates.row_environment(4)
    assert int(env["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 4)


def test_definitions_and_names_are_checked(smoke_original, tmp_path):
    c = candidates.parse_definition("mine:sla2.feature_map=hedgehog, calibration.stage1.steps=3")
    assert c.name == "mine" and c.overrides == {"sla2.feature_map": "hedgehog", "calibration.stage1.steps": 3}
    with pytest.raises(UsageError, match="expected NAME:key=value"):
        candidates.parse_definition("no-colon")
    with pytest.raises(UsageError, match="unknown candidate 'nope'"):
        candidates.run(smoke_original / "model", tmp_path, smoke=True, names=["nope"], device="cpu",
                       log=lambda *_: None)


def test_runs_at_other_sparsities_merge_into_one_comparison(smoke_original, tmp_path, capsys):
    """Two runs of one sparsity each become one table and plot with both sparsities and every statistic as its
    run computed it; runs on another footing, or the same (candidate, sparsity) twice, stop with one line."""
    runs = []
    for topk in (0.1, 0.2):
        out = tmp_path / f"top{topk}"
        candidates.run(smoke_original / "model", out, classifier_dir=smoke_original / "clf", smoke=True,
                       settings_override={"seeds": [0], "topks": [topk], "sample_topks": [topk]}, names=["paper"],
                       device="cpu", log=lambda *_: None)
        runs.append(json.loads((out / "results.json").read_text()))
    merged_dir = tmp_path / "merged"
    candidate_merge.main([str(tmp_path / "top0.1"), str(tmp_path / "top0.2" / "results.json"), "--out",
                          str(merged_dir)])
    merged = json.loads((merged_dir / "results.json").read_text())
    entries = {(e["candidate"], e["topk"]): e for e in merged["summary"]}
    assert set(entries) == {("dense control", 1.0), ("paper", 0.1), ("paper", 0.2)}
    for run, topk in zip(runs, (0.1, 0.2)):
        own = next(e for e in run["summary"] if e["candidate"] == "paper")
        assert entries[("paper", topk)] == own and own["topk"] == topk and "vs_control" in own
    assert entries[("dense control", 1.0)] == next(e for e in runs[0]["summary"] if e["candidate"] == "dense control")
    ids = [r["id"] for r in merged["rows"]]
    assert len(ids) == 4 and len(set(ids)) == 4 and "dense control/dense/s0 (run 2)" in ids
    md = (merged_dir / "results.md").read_text()
    assert "| candidate | 80% | 90% |" in md and md.count("| paper | 80% |") == 1  # both runs' samples
    assert (merged_dir / "loss_vs_sparsity.png").stat().st_size > 0

    def refused(*paths):
        with pytest.raises(SystemExit) as exc:
            candidate_merge.main([*map(str, paths), "--out", str(tmp_path / "refused")])
        assert exc.value.code == 3
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    other = dict(runs[1], settings={**runs[1]["settings"], "stage2": {**runs[1]["settings"]["stage2"], "steps": 7}})
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "settings.stage2 differs" in refused(tmp_path / "top0.1", tmp_path / "other.json")
    assert "paper at top-k 0.1 is in two runs" in refused(tmp_path / "top0.1", tmp_path / "top0.1" / "results.json")
    assert "no results.json" in refused(tmp_path / "nowhere")
    assert not (tmp_path / "refused").exists()
