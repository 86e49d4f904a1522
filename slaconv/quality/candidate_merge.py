"""Several candidate runs as one comparison: one table and one loss-vs-sparsity plot.

    python -m slaconv.quality.candidate_merge RUN [RUN ...] --out DIR [--compare A:B ...]

A GPU call fits one sparsity of the candidate comparison (:mod:`slaconv.quality.candidates`), so the grid
85 / 90 / 95 / 97% comes from several runs.  Each RUN is a run's folder or its ``results.json``.  The runs must
stand on the same footing: the same held-out triples of the same original (their digest) and the same
training and evaluation settings; anything else stops the merge with a one-line error naming the setting
(exit code 3, as for any unusable input).
Every statistic is kept as its run computed it (each row against the dense control of its own run); the
merged table shows the first run's control.  ``--compare A:B`` adds, per sparsity where both candidates have
rows, A's held-out loss over B's paired on the same triples (each triple averaged over the seeds both have),
with a bootstrap 95% interval: whether an option pays against the row without it.  Writes results.md,
results.json and loss_vs_sparsity.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slaconv.errors import InputError, UsageError
from slaconv.quality import candidate_report
from slaconv.quality.candidate_report import CONTROL
from slaconv.quality.command_line import one_line_errors
from slaconv.quality.tail_report import paired_bootstrap

# settings that decide what a row's numbers mean; the sparsities, candidates, job slots and device may differ
FOOTING = ("block_q", "block_k", "quant", "calib_samples", "stage1", "stage2", "timestep_shift", "heldout_samples",
           "sample_per_class", "sample_steps", "guidance", "calib_null_every", "seeds", "objective", "frames",
           "recipe_set")


def load_run(path: Path) -> dict:
    """A run's results.json (``path`` is the file or the run's folder)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no results.json of a candidate run there")
    try:
        result = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: not JSON ({exc})") from None
    missing = [k for k in ("settings", "original", "rows", "summary", "row_state") if k not in result]
    if missing:
        raise InputError(f"{file}: not a candidate run's results (no {', '.join(missing)})")
    result["_source"] = str(file)
    return result


def _check_footing(first: dict, other: dict) -> None:
    where = f"{other['_source']} against {first['_source']}"
    if other["original"]["heldout_digest"] != first["original"]["heldout_digest"]:
        raise InputError(f"{where}: scored on other held-out triples (another original or held-out set)")
    for key in FOOTING:
        a, b = first["settings"].get(key), other["settings"].get(key)
        if a != b:
            raise InputError(f"{where}: settings.{key} differs ({b!r} against {a!r})")


def _portable(source: str) -> str:
    """A run's path as the merged file keeps it: relative paths as given, absolute ones by their last two parts."""
    path = Path(source)
    return source if not path.is_absolute() else str(Path(*path.parts[-2:]))


def merge(results: list[dict]) -> dict:
    """One result in the shape :func:`candidate_report.markdown` and :func:`candidate_report.plot` read."""
    if not results:
        raise InputError("no runs to merge")
    first = results[0]
    for other in results[1:]:
        _check_footing(first, other)
    summary, seen, control = [], {}, None
    rows, row_state, skipped = [], {}, {}
    for index, result in enumerate(results, 1):
        for entry in result["summary"]:
            if entry["candidate"] == CONTROL:
                control = control or entry
                continue
            key = (entry["candidate"], entry["topk"])
            if key in seen:
                raise InputError(f"{entry['candidate']} at top-k {entry['topk']:g} is in two runs: "
                                 f"{seen[key]} and {result['_source']}")
            seen[key] = result["_source"]
            summary.append(entry)
        # the controls of every run keep their rows; ids that repeat across runs are told apart by run
        taken = {r["id"] for r in rows}
        for row in result["rows"]:
            # a row's folder by its name in its run: where a run ran is no part of a comparison kept elsewhere
            row = {**row, "folder": str(Path("rows") / Path(row["folder"]).name)}
            if row["id"] in taken:
                row["id"] = f"{row['id']} (run {index})"
            rows.append(row)
        for row_id, state in result["row_state"].items():
            row_state[row_id if row_id not in row_state else f"{row_id} (run {index})"] = state
        skipped.update(result.get("skipped") or {})
    if control is not None:
        summary.insert(0, control)
    settings = dict(first["settings"])
    settings["topks"] = sorted({t for r in results for t in r["settings"]["topks"]}, reverse=True)
    settings["device"] = ", ".join(dict.fromkeys(_device(r) for r in results))
    return {"settings": settings, "skipped": skipped, "row_state": row_state, "original": first["original"],
            "original_loss": first["original_loss"], "original_samples": first["original_samples"],
            "rows": rows, "summary": summary, "seconds_total": round(sum(r["seconds_total"] for r in results), 1),
            "runs": [{"source": _portable(r["_source"]), "device": _device(r), "topks": r["settings"]["topks"],
                      "seconds_total": r["seconds_total"]} for r in results]}


def compare(result: dict, first: str, second: str) -> list[dict]:
    """``first``'s held-out loss over ``second``'s per sparsity both have finished rows at, paired on the same
    triples: each triple's loss averaged over the seeds both candidates have there, then
    :func:`paired_bootstrap` (ratio and difference of the means with 95% intervals).  Rows with a non-finite
    loss are left out, as the report leaves them out."""
    losses: dict[tuple[str, float], dict[int, list[float]]] = {}
    for row in result["rows"]:
        if not row.get("non_finite"):
            losses.setdefault((row["candidate"], row["topk"]), {})[row["seed"]] = row["heldout_losses"]
    found = {name for name, _ in losses}
    for name in (first, second):
        if name not in found:
            raise UsageError(f"--compare: no finished rows of candidate {name!r} (have: {', '.join(sorted(found))})")
    comparisons = []
    for topk in sorted({t for c, t in losses if c == first} & {t for c, t in losses if c == second}):
        a, b = losses[(first, topk)], losses[(second, topk)]
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue

        mean_a, mean_b = (torch.tensor([runs[s] for s in seeds], dtype=torch.float64).mean(dim=0) for runs in (a, b))
        comparisons.append({"first": first, "second": second, "topk": topk, "seeds": seeds,
                            **paired_bootstrap(mean_a, mean_b)})
    return comparisons


def comparisons_markdown(comparisons: list[dict]) -> str:
    """One line per pair, one column per sparsity: the ratio with its interval (and the seeds, when not all)."""
    topks = sorted({c["topk"] for c in comparisons}, reverse=True)
    pairs = list(dict.fromkeys((c["first"], c["second"]) for c in comparisons))
    cells = {(c["first"], c["second"], c["topk"]): c for c in comparisons}
    lines = ["## Paired comparisons", "",
             "A's held-out loss over B's on the same triples (each averaged over the seeds both have), bootstrap 95%.",
             "", "| A over B | " + " | ".join(candidate_report.pct(t) for t in topks) + " |",
             "|---|" + "---:|" * len(topks)]
    for first, second in pairs:
        row = []
        for t in topks:
            c = cells.get((first, second, t))
            row.append("" if c is None else f"{c['ratio']:.3f} [{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}]"
                       f" (seeds {', '.join(map(str, c['seeds']))})")
        lines.append(f"| `{first}` over `{second}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare_argument(text: str) -> tuple[str, str]:
    """``A:B`` of ``--compare`` -> (A, B)."""
    first, colon, second = text.partition(":")
    if not colon or not first.strip() or not second.strip():
        raise UsageError(f"--compare {text!r}: expected CANDIDATE:CANDIDATE, e.g. hedgehog+linear-all:linear-all")
    return first.strip(), second.strip()


def _device(result: dict) -> str:
    return (result.get("env") or {}).get("gpu") or result["settings"].get("device", "?")


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders or their results.json")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--compare", action="append", default=[], metavar="A:B",
                    help="A's loss over B's, paired, per sparsity (repeat)")
    args = ap.parse_args(argv)
    pairs = [compare_argument(text) for text in args.compare]
    merged = merge([load_run(p) for p in args.runs])
    merged["comparisons"] = [c for first, second in pairs for c in compare(merged, first, second)]
    args.out.mkdir(parents=True, exist_ok=True)
    candidate_report.write(args.out, merged)
    text = candidate_report.markdown(merged)
    if merged["comparisons"]:
        extra = "\n" + comparisons_markdown(merged["comparisons"])
        with open(args.out / "results.md", "a") as md:
            md.write(extra)
        text += extra
    print(text)


if __name__ == "__main__":
    main()
