"""Compare the attention statistics of two originals: the natural-image one and the shipped glyph one.

Reads the ``results.json`` that :mod:`slaconv.quality.attention_stats` wrote for each model and the natural
model's ``train_summary.json``, and writes ``stats.json`` (both models' summaries, by layer and by noise
level) and ``summary.md`` (the headline numbers side by side, against the SLA paper's Wan2.1 figure).

    python -m slaconv.quality.natural_report --natural STATS_DIR --shipped STATS_DIR \\
        --train-summary DIT/train_summary.json --out OUTDIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slaconv.quality import common
from slaconv.quality.command_line import one_line_errors
from slaconv.utils.files import read_json, write_text_atomic

WAN21_ABOVE_MEAN = 0.081  # SLA paper: share of Wan2.1's attention weights above 1/N
# (column in attention_stats' summary, label); oracle_f = mass of the best f share of key blocks.
HEADLINE = (("above_mean", "weights above 1/N"), ("oracle_0.03", "mass of top 3% key blocks"),
            ("oracle_0.05", "mass of top 5% key blocks"), ("oracle_0.1", "mass of top 10% key blocks"),
            ("heuristic_0.03", "heuristic router, 3% blocks"), ("token_0.03", "per-query top 3% keys"),
            ("blocks_for_90", "key blocks for 90% mass"), ("own_frame", "own-frame mass"),
            ("rank_tail", "stable rank of the 97% tail"))


def headline(results: dict) -> dict:
    """The headline columns of one attention_stats results.json (mean over layers, heads, videos, noise levels)."""
    row = results["by_sigma"]["all"]
    return {key: row[key] for key, _ in HEADLINE if key in row}


def summary_md(natural: dict, shipped: dict, train: dict) -> str:
    """summary.md: training facts, then the two models' headline numbers side by side."""
    n, s = headline(natural), headline(shipped)
    settings = natural["settings"]
    lines = [
        "# Natural-image original: attention statistics",
        "",
        f"Trained on PhotoVideo ({train['spec']['frames']} frames x {train['spec']['size']}^2, "
        f"{settings['tokens']} tokens, {settings['key_blocks']} key blocks of {settings['block_k']}): "
        f"{train['steps_done']} steps of {train['settings']['batch_size']} videos + "
        f"{train['settings']['image_batch']} single frames in {train['train_seconds']:.0f} s "
        f"({train['env'].get('gpu', 'CPU')}); held-out loss {train['heldout_fm_loss']['loss']:.4f}, "
        f"checkpoint {train['checkpoint_mb']:.1f} MiB.",
        "",
        f"Attention statistics (attention_stats, {settings['videos']} held-out videos x sigma {settings['sigmas']}, "
        "mean over layers and heads). The SLA paper reports "
        f"{WAN21_ABOVE_MEAN:.1%} of Wan2.1's weights above 1/N.",
        "",
        "| statistic | natural original | shipped original |",
        "|---|---|---|",
    ]
    for key, label in HEADLINE:
        if key in n and key in s:
            fmt = ".1f" if key in ("blocks_for_90", "rank_tail") else ".3f"
            lines.append(f"| {label} | {n[key]:{fmt}} | {s[key]:{fmt}} |")
    lines += ["", "Per layer: `stats.json` (`natural.by_layer`, `shipped.by_layer`).", ""]
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, what in (("--natural", "attention_stats --out of the natural model"),
                       ("--shipped", "attention_stats --out of the shipped model"),
                       ("--train-summary", "the natural model's train_summary.json"),
                       ("--out", "folder for stats.json and summary.md")):
        ap.add_argument(flag, type=Path, required=True, help=what)
    args = ap.parse_args(argv)
    natural, shipped = read_json(args.natural / "results.json"), read_json(args.shipped / "results.json")
    train = read_json(args.train_summary)
    common.write_json(args.out / "stats.json", {
        name: {"headline": headline(r), "settings": r["settings"], "by_layer": r["by_layer"],
               "by_sigma": r["by_sigma"], "seconds": r["seconds"]}
        for name, r in (("natural", natural), ("shipped", shipped))} | {"wan21_above_mean": WAN21_ABOVE_MEAN})
    write_text_atomic(args.out / "summary.md", summary_md(natural, shipped, train))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
