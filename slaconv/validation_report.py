"""Writing a validation report: ``reports/validation.json``, ``validation.md`` and the plots."""

from __future__ import annotations

from .plots import bar_chart, mask_image
from .text_table import table
from .utils.files import write_json, write_text_atomic
from .workdir import WorkDir

# summary key -> (label, format, gate key and comparison when gated); the dense baseline's attention is full
# attention by definition, so its attention figures are not measured
_ROWS = (
    ("attention_rel_l2_mean", "attention rel. L2 (mean over layers)", "{:.4f}", "attention_rel_l2_max", "<="),
    ("attention_cosine_mean", "attention cosine (mean)", "{:.4f}", None, None),
    ("velocity_rel_l2_mean", "velocity rel. L2 (mean over timesteps)", "{:.4f}", "velocity_rel_l2_max", "<="),
    ("velocity_vs_convert_only", "velocity rel. L2 / convert only's", "{:.3f}", "velocity_vs_convert_only_max", "<="),
    ("sample_rel_l2", "sample final-latent rel. L2", "{:.4f}", None, None),
    ("sample_psnr_db", "sample PSNR (dB)", "{:.2f}", "sample_psnr_min_db", ">="),
    ("sparsity_mean", "sparsity (mean)", "{:.3f}", None, None),
)
PLOT_FILES = ("layer_error.png", "router_mask.png")
"""The plots a validation writes into the work dir's ``reports/`` (the mask only where masks were captured)."""
_DENSE_BY_DEFINITION = {"attention_rel_l2_mean", "attention_cosine_mean", "sparsity_mean"}


def write_reports(work: WorkDir, report: dict, masks: dict | None) -> None:
    """``validation.json`` (``report`` as is), ``validation.md`` and the PNG plots into ``work``'s reports."""
    out = work.reports_dir
    out.mkdir(exist_ok=True)
    write_json(work.validation_report_path, report)
    layers = report["layers"]
    bar_chart(out / PLOT_FILES[0], [x["layer"] for x in layers],
              {"attention rel L2": [x["attention_rel_l2"] for x in layers],
               "1 - cosine": [1 - x["attention_cosine"] for x in layers]},
              "SLA2 vs full attention, per layer")
    if masks:
        name, mask = next(iter(masks.items()))
        mask_image(out / PLOT_FILES[1], mask, f"router block mask of {name}, first sample, heads 0-{len(mask) - 1}")
    write_text_atomic(work.validation_markdown_path, markdown_report(report))


def _cell(values: dict, key: str, fmt: str, missing: str) -> str:
    value = values.get(key)
    return missing if value is None else fmt.format(value)


def _summary_rows(report: dict) -> list[list[str]]:
    """One row per summary metric: label, this model, dense, convert only, gate."""
    s, gates = report["summary"], report["gates"]
    baselines = report.get("baselines") or {}
    dense, convert_only = baselines.get("dense", {}), baselines.get("convert_only", {})
    rows = []
    for key, label, fmt, gate, op in _ROWS:
        rule = f"{op} {gates[gate]['threshold']}" if gate in gates else ""
        dense_missing = "full attention" if key in _DENSE_BY_DEFINITION else "-"
        rows.append([label, _cell(s, key, fmt, "-"), _cell(dense, key, fmt, dense_missing),
                     _cell(convert_only, key, fmt, "-"), rule])
    return rows


def terminal_summary(work: WorkDir, report: dict) -> str:
    """What ``slaconv validate`` prints: the verdict, the summary as an aligned table, where the reports are."""
    written = [work.validation_report_path, work.validation_markdown_path,
               *(work.reports_dir / name for name in PLOT_FILES)]
    failed = [name for name, gate in report["gates"].items() if not gate.get("passed", True)]
    verdict = "PASSED" if report["passed"] else f"FAILED ({', '.join(failed)})" if failed else "FAILED"
    return "\n".join([
        f"validation {verdict}: {work.path}", "",
        *table(["metric", "this model", "dense (full attention)", "convert only", "gate"],
               [*_summary_rows(report), ["low-bit mode", report["summary"]["quant"], "", "", ""]]),
        "", "reports written:", *(f"  {path}" for path in written if path.is_file()),
    ])


def markdown_report(report: dict) -> str:
    """The human-readable ``reports/validation.md`` of a validation report."""
    convert_only = (report.get("baselines") or {}).get("convert_only", {})
    lines = [
        f"# SLA2 validation: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        "Every model is compared with the original (stock attention) on the same seeded inputs. Baselines: *dense* "
        "is this model's weights with full attention (the original itself unless stage 2 changed the weights); "
        "*convert only* is the original with SLA2 as `convert` left it (identity router, initial alpha), the "
        "starting point calibration should improve on. The sample PSNR compares "
        f"{report['settings']['sample_steps']}-step Euler samples from the same noise (99 dB: identical).",
        "",
        "| metric | this model | dense (full attention) | convert only | gate |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(report)]
    lines += [f"| low-bit mode | {report['summary']['quant']} | | | |"]
    if convert_only.get("alpha"):
        lines += ["", f"Convert-only alpha: {convert_only['alpha']}."]
    lines += ["", "| layer | rel. L2 | cosine | sparsity | alpha per head |", "|---|---|---|---|---|"]
    for x in report["layers"]:
        alpha = ", ".join(f"{a:.2f}" for a in x["alpha"])
        lines.append(f"| {x['layer']} | {x['attention_rel_l2']:.4f} | {x['attention_cosine']:.4f} | "
                     f"{x['sparsity']:.3f} | {alpha} |")
    lines += ["", "| timestep | velocity rel. L2 |", "|---|---|"]
    lines += [f"| {t} | {e:.4f} |" for t, e in report["velocity_rel_l2_by_timestep"].items()]
    digest = (report.get("weights") or {}).get("digest")
    if digest:
        lines += ["", f"Measured weights and settings: `{digest}` (see `slaconv inspect`: the verdict holds only "
                      "while the model still has this digest)."]
    lines += ["", "![per-layer error](layer_error.png) ![router mask](router_mask.png)", ""]
    return "\n".join(lines)
