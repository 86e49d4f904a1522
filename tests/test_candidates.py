"""The candidate comparison (slaconv.quality.candidates) end to end at smoke size on the CPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    extra = candidates.parse_definition("slow-router:calibration.stage1.lr=1e-5,sla2.token_tile=2x2x4")
    unknown = candidates.parse_definition("tail-sampler:sla2.tail_sampler=pooled")
    res = candidates.run(smoke_original / "model", out, classifier_dir=smoke_original / "clf", smoke=True,
                         settings_override={"seeds": [0], "recipe_set": {"calibration.stage2.lr_schedule": "cosine"}},
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
    assert rows["slow-router/90/s0"]["calibration"]["stage1"]["lr"] == 1e-5  # the overrides reached the CLI
    assert json.loads((out / "rows" / "slow-router_90_s0" / "work" / "sla2_config.json").read_text()
                      )["token_tile"] == [2, 2, 4]
    # the run's own keys reach every row, the dense control's too, and the report says so
    assert {r["calibration"]["stage2"]["lr_schedule"] for r in rows.values()} == {"cosine"}
    assert "every row `calibration.stage2.lr_schedule: cosine`" in md
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


def test_definitions_and_names_are_checked(smoke_original, tmp_path, monkeypatch):
    c = candidates.parse_definition("mine:sla2.feature_map=hedgehog, calibration.stage1.steps=3")
    assert c.name == "mine" and c.overrides == {"sla2.feature_map": "hedgehog", "calibration.stage1.steps": 3}
    with pytest.raises(UsageError, match="expected NAME:key=value"):
        candidates.parse_definition("no-colon")
    with pytest.raises(UsageError, match="--set 'a=1,b': 'b' is not key=value"):
        candidates.parse_assignments("a=1,b", "--set", "a=1,b")
    with pytest.raises(UsageError, match="unknown candidate 'nope'"):
        candidates.run(smoke_original / "model", tmp_path, smoke=True, names=["nope"], device="cpu",
                       log=lambda *_: None)
    # the command line's --set reaches every row's settings
    seen = {}
    monkeypatch.setattr(candidates, "run", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(candidates.candidate_report, "markdown", lambda res: "")
    candidates.main(["--model", str(tmp_path), "--out", str(tmp_path), "--set", "calibration.stage2.lr_schedule=cosine",
                     "--set", "calibration.stage2.lr=3e-5,calibration.seed=2", "--stage2-steps", "7"])
    assert seen["settings_override"]["recipe_set"] == {"calibration.stage2.lr_schedule": "cosine",
                                                       "calibration.stage2.lr": 3e-5, "calibration.seed": 2}
    assert seen["settings_override"]["stage2"] == {"steps": 7}


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
    assert all(r["folder"].startswith("rows/") for r in merged["rows"])  # no path of the machine it ran on
    assert not any(Path(run["source"]).is_absolute() for run in merged["runs"])
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


def test_a_row_with_a_non_finite_loss_is_flagged_and_kept_out_of_the_summary():
    """One held-out triple of the seed-0 control scored NaN: every statistic that would read it says so instead of
    turning into NaN; the summary pairs the candidate's seeds with the usable control seeds only."""
    from slaconv.quality import candidate_report

    g = torch.Generator().manual_seed(3)
    base = (0.05 + 0.01 * torch.rand(32, generator=g, dtype=torch.float64)).tolist()
    original = {"heldout_losses": base, "heldout_digest": "d"}

    def row(candidate, topk, seed, scale):
        losses = [x * scale * (1 + 0.02 * float(torch.rand((), generator=g))) for x in base]
        tag = "dense" if topk == 1.0 else f"{round((1 - topk) * 100)}"
        return {"id": f"{candidate}/{tag}/s{seed}", "candidate": candidate, "topk": topk, "seed": seed,
                "heldout_digest": "d", "heldout_losses": losses, "seconds": 1.0}

    rows = [row("dense control", 1.0, 0, 1.1), row("dense control", 1.0, 1, 1.1),
            row("paper", 0.03, 0, 1.6), row("paper", 0.03, 1, 1.6)]
    rows[0]["heldout_losses"][7] = float("nan")
    stats = candidate_report.statistics(rows, original)
    by_id = {r["id"]: r for r in stats["rows"]}
    assert by_id["dense control/dense/s0"]["non_finite"] == [7] and by_id["paper/97/s0"]["non_finite"] == []
    assert "vs_control" not in by_id["paper/97/s0"] and "vs_control" in by_id["paper/97/s1"]
    entries = {(e["candidate"], e["topk"]): e for e in stats["summary"]}
    control, paper = entries[("dense control", 1.0)], entries[("paper", 0.03)]
    assert control["seeds"] == [1] and paper["seeds"] == [0, 1] and paper["control_seeds"] == [1]
    want = paired_bootstrap(torch.tensor(rows[3]["heldout_losses"], dtype=torch.float64),
                            torch.tensor(rows[1]["heldout_losses"], dtype=torch.float64))
    assert paper["vs_control"] == want and want["difference"] > 0
    for stat in (paper["vs_original"], paper["vs_control"], control["vs_original"]):
        assert all(v == v for v in [stat["ratio"], *stat["ratio_ci"], stat["difference"]])  # no NaN anywhere
    result = {**stats, "original_samples": {"accuracy": None}, "skipped": {}, "seconds_total": 1,
              "row_state": {r["id"]: "done" for r in rows},
              "settings": {"heldout_samples": 32, "seeds": [0, 1], "quant": "int8-fp8", "objective": "diffusion",
                           "device": "cpu", "stage1": {"steps": 1}, "stage2": {"steps": 1, "batch_size": 1, "lr": 1e-4}}}
    md = candidate_report.markdown(result)
    assert "non-finite held-out loss in 1 row(s)" in md and "- dense control/dense/s0: 1 of 32 triples (7)" in md
    assert md.index("non-finite") < md.index("## Held-out loss")
    control_table = md[md.index("## Held-out loss minus"):md.index("## Every row")]
    assert "(seed 1)" in control_table and "nan" not in md.split("## Every row")[0]


def test_compare_pairs_two_candidates_on_the_seeds_both_have():
    """--compare A:B: per sparsity, A's per-triple losses over B's, each averaged over the seeds both have (a seed
    only one has is left out), a non-finite row is left out, and a candidate with no rows is a one-line error."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(32, generator=g, dtype=torch.float64) + 0.5

    def row(candidate, topk, seed, scale, non_finite=False):
        return {"candidate": candidate, "topk": topk, "seed": seed, "non_finite": non_finite,
                "heldout_losses": (base * scale + 0.01 * seed).tolist()}

    result = {"rows": [row("a", 0.03, 0, 0.9), row("a", 0.03, 1, 0.9), row("b", 0.03, 0, 1.0), row("b", 0.03, 1, 1.0),
                       row("a", 0.05, 0, 0.8), row("b", 0.05, 0, 1.0), row("b", 0.05, 1, 5.0),
                       row("a", 0.10, 0, 0.5, non_finite=True), row("b", 0.10, 0, 1.0)]}
    got = {c["topk"]: c for c in candidate_merge.compare(result, "a", "b")}
    assert set(got) == {0.03, 0.05}  # 0.10: a's only row is non-finite
    assert got[0.03]["seeds"] == [0, 1] and got[0.05]["seeds"] == [0]
    want = (base * 0.9 + 0.005).mean() / (base + 0.005).mean()
    assert got[0.03]["ratio"] == pytest.approx(float(want), rel=1e-12)
    assert got[0.05]["ratio"] == pytest.approx(float((base * 0.8).mean() / base.mean()), rel=1e-12)
    lo, hi = got[0.03]["ratio_ci"]
    assert lo < got[0.03]["ratio"] < hi < 1.0
    assert "| `a` over `b` |" in candidate_merge.comparisons_markdown(list(got.values()))
    with pytest.raises(UsageError, match="no finished rows of candidate 'c'"):
        candidate_merge.compare(result, "a", "c")
    with pytest.raises(UsageError, match="expected CANDIDATE:CANDIDATE"):
        candidate_merge.compare_argument("a-b")
