"""The measurements behind the default quality gates: ``slaconv validate`` on working and broken models.

For each model -- the demo's tiny random-weight Wan (``slaconv demo``, its recipe) and the quality benchmark's
trained DiT (``make demo-trained``'s settings: single 64 x 64 frames, top-k 0.25, the same calibration
budget) -- this converts, calibrates and breaks work dirs through the real CLI and validates each one:

    dense control        top-k 1, alpha pinned to 1, no low-bit mode: full attention through the SLA2 path,
                         a sanity row that must read ~0 error
    convert only         identity router, initial alpha, at the recipe's sparsity
    stage 1 only         + router and alpha calibration
    calibrated           + stage 2 (the recipe's budget)
    router randomised    the calibrated work dir with every router matrix replaced by a random one
    alpha forced to 0    the calibrated work dir with every alpha logit at -20 (the linear branch alone)
    ruined (lr 1.0)      stage 1, then stage 2 at learning rate 1.0

    python -m slaconv.quality.gate_table --out OUT [--model demo --model dit] [--device cpu]

Writes OUT/gates.md (one table per model) and OUT/gates.json (every validation report's summary, baselines and
verdict under the gates in force), plus the work dirs; a rerun into the same OUT reuses the work dirs it
finished and validates them again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slaconv.quality import common
from slaconv.quality import synthvideo as sv
from slaconv.quality.command_line import one_line_errors
from slaconv.quality.slaconv_cli import SlaconvCLI
from slaconv.quality.table import write_recipe
from slaconv.quality.table_settings import table_settings
from slaconv.quality.workdirs import PIN, copy_workdir, edit_sla2_state

DIT_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "quality" / "checkpoint" / "model"
# make demo-trained's settings
DIT_OVERRIDE = {"frames": 1, "topks": [0.25], "block_q": 64, "stage1": {"steps": 40},
                "stage2": {"steps": 30, "batch_size": 2}, "calib_samples": 32}
ROWS = ("dense control", "convert only", "stage 1 only", "calibrated", "router randomised", "alpha forced to 0",
        "ruined (lr 1.0)")
METRICS = (("attention_rel_l2_mean", "{:.4f}"), ("velocity_rel_l2_mean", "{:.4f}"), ("sample_rel_l2", "{:.4f}"),
           ("sample_psnr_db", "{:.2f}"), ("velocity_vs_convert_only", "{:.2f}"), ("sparsity_mean", "{:.3f}"))


def demo_inputs(out: Path) -> tuple[Path, Path, Path]:
    """(base model, data, recipe) of ``slaconv demo``."""
    from slaconv.demo import DEMO_RECIPE, TINY_WAN, build_tiny_wan
    from slaconv.recipe import Recipe
    from slaconv.synthetic_data import write_synthetic_dataset

    recipe = Recipe.from_dict(DEMO_RECIPE)
    recipe.save(out / "recipe.yaml")
    d = recipe.data
    data = write_synthetic_dataset(out / "data", num_samples=8, channels=TINY_WAN["in_channels"], frames=d.frames,
                                   height=d.height, width=d.width, text_len=d.text_len,
                                   text_dim=TINY_WAN["text_dim"], seed=0)
    return build_tiny_wan(out / "base"), Path(data), out / "recipe.yaml"


def dit_inputs(out: Path, model_dir: Path = DIT_MODEL) -> tuple[Path, Path, Path]:
    """(base model, data, recipe) of ``make demo-trained``."""
    import dataclasses

    settings = table_settings(False, DIT_OVERRIDE)
    spec, _ = common.trained_spec(model_dir)
    spec = dataclasses.replace(spec, frames=settings["frames"])
    data = out / "data"
    if not data.is_dir():
        sv.write_slaconv_dataset(data, common.CALIB_SEED, settings["calib_samples"], spec, dtype=torch.float16,
                                 null_every=settings["calib_null_every"])
    recipe = write_recipe(out / "recipe.yaml", settings, spec, topk=settings["topks"][0])
    return model_dir, data, recipe


def measure(name: str, base: Path, data: Path, recipe: Path, out: Path, cli: SlaconvCLI) -> dict:
    """Every row of the module docstring for one model: ``{row: validation report}``."""
    work = out / "work"
    common_args = ("--data", str(data), "--recipe", str(recipe))

    def validate(wd: Path) -> dict:
        return cli("validate", str(wd), *common_args, ok_codes=(0, 4))

    def build(folder: Path, *steps) -> Path:
        """Run ``steps`` (callables) to build ``folder`` unless a finished earlier run left it (a marker file)."""
        done = folder.parent / f"{folder.name}.done"
        if not done.is_file():
            for step in steps:
                step()
            done.write_text("")
        return folder

    dense, converted = work / "dense-control", work / "convert-only"
    stage1, calibrated = work / "stage1", work / "calibrated"
    randomised, linear, ruined = work / "router-randomised", work / "alpha-0", work / "ruined"
    build(dense, lambda: cli("convert", str(base), "-o", str(dense), *common_args, "--topk", "1.0", "--quant", "none",
                             "--overwrite"),
          lambda: edit_sla2_state(dense, alpha_logit=PIN))
    build(converted, lambda: cli("convert", str(base), "-o", str(converted), *common_args, "--overwrite"))
    build(stage1, lambda: copy_workdir(converted, stage1),
          lambda: cli("calibrate", str(stage1), *common_args, "--stage", "1"))
    build(calibrated, lambda: copy_workdir(stage1, calibrated),
          lambda: cli("calibrate", str(calibrated), *common_args, "--stage", "2"))
    build(randomised, lambda: copy_workdir(calibrated, randomised),
          lambda: edit_sla2_state(randomised, random_router_seed=0))
    build(linear, lambda: copy_workdir(calibrated, linear), lambda: edit_sla2_state(linear, alpha_logit=-PIN))
    build(ruined, lambda: copy_workdir(stage1, ruined),
          lambda: cli("calibrate", str(ruined), *common_args, "--stage", "2", "--lr", "1.0"))
    dirs = dict(zip(ROWS, (dense, converted, stage1, calibrated, randomised, linear, ruined), strict=True))
    return {row: validate(wd) for row, wd in dirs.items()}


def markdown(results: dict) -> str:
    """One table per model: every row's metrics and its verdict under the gates in force."""
    lines = ["# Quality gates: what `slaconv validate` measures on working and broken models", ""]
    for model, rows in results.items():
        gates = next(iter(rows.values()))["gates"]
        lines += [f"## {model}", "",
                  "gates in force: " + ", ".join(f"{k} {g['threshold']}" for k, g in gates.items()), "",
                  "| row | " + " | ".join(key for key, _ in METRICS) + " | passed |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        for row, report in rows.items():
            s = report["summary"]
            cells = [fmt.format(s[key]) if s.get(key) is not None else "-" for key, fmt in METRICS]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'yes' if report['passed'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", action="append", choices=["demo", "dit"], help="which models (default: both)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cli = SlaconvCLI(False, args.device, print)
    results = {}
    for name in args.model or ["demo", "dit"]:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        inputs = demo_inputs(out) if name == "demo" else dit_inputs(out)
        results[name] = measure(name, *inputs, out, cli)
        (args.out / "gates.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gates.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
