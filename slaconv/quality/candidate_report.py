"""The candidate comparison's statistics, results.md, results.json and loss-vs-sparsity plot.

Every interval is a paired bootstrap over the held-out (video, noise, sigma) triples
(:func:`slaconv.quality.tail_report.paired_bootstrap`): a row's per-triple losses against the original's on
the same triples (ratio of the means), and against its seed's dense control (difference of the means).  The
per-candidate summary averages each triple's loss over the seeds first, then resamples the triples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slaconv.plots import line_chart
from slaconv.quality import common, metrics
from slaconv.quality.tail_report import paired_bootstrap

CONTROL = "dense control"


def pct(topk: float) -> str:
    return f"{round((1 - topk) * 100)}%"


def sample_scores(folder: Path, reference: torch.Tensor, classify) -> dict:
    """PSNR / SSIM of the row's samples against the original's from the same seeds, and the judge's scores."""
    videos = torch.load(folder / "samples.pt")
    return {**metrics.summarize_fidelity(videos, reference), **classify(videos)}


def summarize(rows: list[dict], original: dict, out: Path, classifier_dir: Path | None, spec, device) -> dict:
    """Per-row and per-(candidate, sparsity) statistics of the finished ``rows``, with their samples scored."""
    reference = torch.load(out / "original_samples.pt")
    labels = metrics.sampling_set(spec, reference.shape[0] // spec.num_classes)["labels"]
    clf = metrics.load_classifier(classifier_dir, device) if classifier_dir else None

    def classify(videos):
        if clf is None:
            return {"accuracy": None, "accuracy_se": None}
        scores = metrics.classifier_scores(clf, videos, labels)
        return {"accuracy": scores["accuracy"], "accuracy_se": scores["accuracy_se"]}

    samples = {r["id"]: sample_scores(Path(r["folder"]), reference, classify) for r in rows if r.get("has_samples")}
    return {**statistics(rows, original, samples), "original_samples": classify(reference)}


def statistics(rows: list[dict], original: dict, samples: dict | None = None) -> dict:
    """The paired statistics of ``rows`` against the original and the dense control (``samples``: scores of the
    rows that drew samples, by row id).  A row scored on other triples, or with a non-finite loss on any triple
    (``non_finite`` lists them), is kept in the row list but left out of every summary and of the controls; a
    summary's difference to the control pairs seeds, over those with a usable control (``control_seeds``)."""
    samples = samples or {}
    base = torch.tensor(original["heldout_losses"], dtype=torch.float64)
    out_rows = []
    for r in rows:
        est = torch.tensor(r["heldout_losses"], dtype=torch.float64)
        row = {k: v for k, v in r.items() if k not in ("heldout_losses", "cli_calls")}
        row["same_triples"] = r["heldout_digest"] == original["heldout_digest"]
        row["non_finite"] = [i for i, finite in enumerate(torch.isfinite(est).tolist()) if not finite]
        row["loss"] = float(est.mean())
        row["vs_original"] = paired_bootstrap(est, base)
        if r["id"] in samples:
            row["samples"] = samples[r["id"]]
        row["heldout_losses"] = r["heldout_losses"]
        out_rows.append(row)
    usable = [r for r in out_rows if r["same_triples"] and not r["non_finite"]]
    controls = {r["seed"]: torch.tensor(r["heldout_losses"], dtype=torch.float64)
                for r in usable if r["candidate"] == CONTROL}
    for row in out_rows:
        if row["seed"] in controls and row["candidate"] != CONTROL:
            row["vs_control"] = paired_bootstrap(torch.tensor(row["heldout_losses"], dtype=torch.float64),
                                                 controls[row["seed"]])

    def mean_losses(members):
        return torch.stack([torch.tensor(m["heldout_losses"], dtype=torch.float64) for m in members]).mean(0)

    summary = []
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in usable:
        groups.setdefault((row["candidate"], row["topk"]), []).append(row)
    for (name, topk), members in groups.items():
        est = mean_losses(members)
        entry = {"candidate": name, "topk": topk, "seeds": sorted(m["seed"] for m in members),
                 "loss": float(est.mean()), "loss_per_seed": [m["loss"] for m in members],
                 "vs_original": paired_bootstrap(est, base)}
        paired = [m for m in members if m["seed"] in controls]
        if paired and name != CONTROL:
            entry["control_seeds"] = sorted(m["seed"] for m in paired)
            control = torch.stack([controls[m["seed"]] for m in paired]).mean(0)
            entry["vs_control"] = paired_bootstrap(mean_losses(paired), control)
        scored = [m["samples"] for m in members if "samples" in m]
        if scored:
            entry["samples"] = {key: _mean([s[key] for s in scored]) for key in ("psnr", "ssim", "accuracy")}
        summary.append(entry)
    return {"original_loss": float(base.mean()), "rows": out_rows, "summary": summary}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _interval(stats: dict | None, key: str, digits: int = 3) -> str:
    if not stats:
        return ""
    lo, hi = stats[f"{key}_ci"]
    return f"{stats[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(result: dict) -> str:
    """results.md: what was skipped or cut first, then the ratio and control tables, samples, every row."""
    s = result["settings"]
    lines = ["# Quality candidates on the same footing", ""]
    if result["skipped"]:
        lines += ["**Skipped candidates** (the installed recipe schema rejects their settings; no row ran):", ""]
        lines += [f"- **{name}**: {why}" for name, why in result["skipped"].items()] + [""]
    unfinished = {k: v for k, v in result["row_state"].items() if v != "done"}
    if unfinished:
        lines += [f"**Rows not finished ({len(unfinished)})**:", ""]
        lines += [f"- {k}: {v}" for k, v in unfinished.items()] + [""]
    if not all(r["same_triples"] for r in result["rows"]):
        lines += ["**WARNING: some rows were scored on other held-out triples and are left out of the summary.**", ""]
    broken = [r for r in result["rows"] if r.get("non_finite")]
    if broken:
        lines += [f"**WARNING: non-finite held-out loss in {len(broken)} row(s), left out of the summary and of "
                  "the controls**:", ""]
        lines += [f"- {r['id']}: {len(r['non_finite'])} of {len(r['heldout_losses'])} triples "
                  f"({', '.join(map(str, r['non_finite'][:10]))})" for r in broken] + [""]
    lines += [f"Original: held-out loss {result['original_loss']:.4f} on {s['heldout_samples']} (video, noise, "
              f"sigma) triples. Every row: stage 1 {s['stage1']['steps']} steps, stage 2 {s['stage2']['steps']} "
              f"steps x batch {s['stage2']['batch_size']} (lr {s['stage2']['lr']:g}, objective {s['objective']}), "
              f"seeds {s['seeds']}; evaluated `{s['quant']}`"
              + "".join(f"; every row `{k}: {v}`" for k, v in s.get("recipe_set", {}).items())
              + ". Intervals: paired bootstrap 95% over the triples, each triple's loss averaged over the seeds "
              "first.", ""]
    topks = sorted({e["topk"] for e in result["summary"] if e["candidate"] != CONTROL}, reverse=True)
    names = list(dict.fromkeys(e["candidate"] for e in result["summary"] if e["candidate"] != CONTROL))
    cell = {(e["candidate"], e["topk"]): e for e in result["summary"]}
    header = "| candidate | " + " | ".join(pct(t) for t in topks) + " |"
    rule = "|---|" + "---:|" * len(topks)
    control = next((e for e in result["summary"] if e["candidate"] == CONTROL), None)
    lines += ["## Held-out loss over the original's", "", header, rule]
    seeds = sorted(s["seeds"])

    def seeds_note(used: list | None) -> str:
        return "" if used is None or sorted(used) == seeds else f" (seed {', '.join(map(str, used))})"

    def ratio_cell(e: dict | None) -> str:
        return _interval(e["vs_original"], "ratio") + seeds_note(e["seeds"]) if e else ""

    def control_cell(e: dict | None) -> str:
        if not e or "vs_control" not in e:
            return ""
        return _interval(e["vs_control"], "difference", 4) + seeds_note(e.get("control_seeds"))

    lines += [f"| {n} | " + " | ".join(ratio_cell(cell.get((n, t))) for t in topks) + " |" for n in names]
    if control:
        lines += [f"| {CONTROL} (any sparsity) | {ratio_cell(control)} |"
                  + " |" * (len(topks) - 1)]
    lines += ["", "## Held-out loss minus the dense control's", "", header, rule]
    lines += [f"| {n} | " + " | ".join(control_cell(cell.get((n, t))) for t in topks) + " |" for n in names]
    sampled = [e for e in result["summary"] if e.get("samples")]
    if sampled:
        acc = result["original_samples"].get("accuracy")
        lines += ["", "## Samples against the original's from the same seeds", "",
                  f"Original's accuracy: {metrics.fmt(acc, '.3f')}.", "",
                  "| candidate | sparsity | PSNR (dB) | SSIM | accuracy |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {e['candidate']} | {pct(e['topk'])} | {metrics.fmt(e['samples']['psnr'], '.2f')} | "
                  f"{metrics.fmt(e['samples']['ssim'], '.3f')} | {metrics.fmt(e['samples']['accuracy'], '.3f')} |"
                  for e in sampled]
    lines += ["", "## Every row", "", "| row | loss | over the original | minus the control | seconds |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['id']} | {r['loss']:.4f} | {_interval(r['vs_original'], 'ratio')} | "
              f"{_interval(r.get('vs_control'), 'difference', 4)} | {r['seconds']:.0f} |" for r in result["rows"]]
    lines += ["", f"Total {result['seconds_total']} s on {result['settings']['device']}."]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict) -> None:
    """Held-out loss against sparsity per candidate (mean of seeds, the paired interval of the ratio times the
    original's loss), with the original and the dense control as horizontal lines."""
    base = result["original_loss"]
    topks = sorted({e["topk"] for e in result["summary"] if e["candidate"] != CONTROL}, reverse=True)
    series: dict[str, list] = {}
    for e in result["summary"]:
        if e["candidate"] == CONTROL:
            continue
        lo, hi = e["vs_original"]["ratio_ci"]
        series.setdefault(e["candidate"], [None] * len(topks))[topks.index(e["topk"])] = (e["loss"], lo * base,
                                                                                          hi * base)
    hlines = {"original": base}
    control = next((e for e in result["summary"] if e["candidate"] == CONTROL), None)
    if control:
        hlines[CONTROL] = control["loss"]
    line_chart(path, [pct(t) for t in topks], series, hlines, "held-out loss vs sparsity (mean of seeds, 95% paired)",
               "sparsity")


def write(out: Path, result: dict) -> None:
    """results.json, results.md and loss_vs_sparsity.png in ``out``."""
    common.write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown(result))
    if result["summary"]:
        plot(out / "loss_vs_sparsity.png", result)
