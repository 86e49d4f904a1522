"""The quality table: the trained original DiT converted by the real slaconv CLI, with the papers' ablations.

For each sparsity (top-k 0.10 / 0.05 / 0.03 = 90 / 95 / 97 %) this drives ``slaconv convert`` and
``slaconv calibrate`` (in-process through Click's CliRunner on ``slaconv.cli.main`` by default, or
``python -m slaconv`` subprocesses with --subprocess) with a recipe it writes, on calibration data it
writes in slaconv's ``--data`` format, and scores every resulting model on the same held-out inputs:

    dense original                       the trained checkpoint, untouched
    SLA2, no fine-tuning                 ``convert`` only: identity (SLA pooled top-k) router, alpha from one pass
    SLA2, stage 1 only                   + router/alpha calibration (SoftTop-k, layer-wise MSE)
    SLA2 (stage 1 + stage 2 QAT)         + end-to-end fine-tune, low-bit (int8-fp8) forward
    w/o stage 1 (heuristic router)       ``calibrate --stage 2`` on the converted model
    w/o QAT (bf16 FT, int8-fp8 eval)     stage 2 with ``calibration.stage2.quant: none``; evaluated low-bit
      (same, evaluated bf16)             the same weights in bf16: what the quantisation alone costs
    sparse only (alpha = 1)              alpha_logit pinned to +20 (linear branch x 2e-9) before stage 1
                                         and again before stage 2; otherwise identical to SLA2
    linear only (alpha = 0)              once, not per sparsity: alpha_logit -20, router zeroed, top-k = the
                                         minimum (1 key block, the rest -- 255/256 at full size -- in the
                                         linear branch), stage 2 with the same budget
    dense fine-tuned (same budget)       only with --objective diffusion (with distill it is a no-op)

Every fine-tuned row gets the same stage-2 budget (steps x batch, lr, data, seed); rows with stage 1
get the same stage-1 budget.  Metrics (:mod:`slaconv.quality.metrics`): held-out flow-matching loss
at fixed noise and noise levels; PSNR / SSIM of 20-step Euler samples against the original's samples
from the same noise and class; the frame classifier's per-frame accuracy w.r.t. the conditioning
class and the frame-to-frame consistency of its predictions.

    python -m slaconv.quality.table --model OUT/dit/model --classifier OUT/classifier --out OUT/quality
    python -m slaconv.quality.table ... --smoke            # tiny CPU run for tests

Writes --out/results.md (the table), results.json (everything, with per-stage summaries),
samples.png (original + every row, same noise), recipes/, data/ and the work dirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
import yaml

from slaconv.errors import InputError, UsageError
from slaconv.quality import common, metrics, report
from slaconv.quality import synthvideo as sv
from slaconv.quality.command_line import (
    add_model_arguments,
    fraction,
    non_negative_float,
    one_line_errors,
    positive_float,
    positive_int,
)
from slaconv.quality.scoring import Evaluator
from slaconv.quality.slaconv_cli import SlaconvCLI, StepFailed, stage_summary
from slaconv.quality.table_settings import table_settings
from slaconv.quality.workdirs import PIN, alpha_range, copy_workdir, edit_sla2_state, load_sla2
from slaconv.recipe import LR_SCHEDULES
from slaconv.utils.devices import release_memory
from slaconv.utils.files import read_json


def write_recipe(path: Path, settings: dict, spec: sv.VideoSpec, *, topk: float, stage2_quant: str | None = None,
                 objective: str = "distill", seed: int = 0) -> Path:
    """A slaconv recipe for this benchmark (keys unknown to this slaconv version are left out)."""
    from slaconv.recipe import Recipe

    s1, s2 = settings["stage1"], settings["stage2"]
    recipe = {
        "name": f"quality-bench-topk{topk}",
        "model": {"family": "wan", "dtype": "float32"},
        "sla2": {"topk": topk, "block_q": settings["block_q"], "block_k": settings["block_k"],
                 "quant": settings["quant"], "alpha_init": "calibrate"},
        "data": {"frames": spec.frames, "height": spec.size, "width": spec.size, "text_len": spec.text_len},
        "calibration": {
            "seed": seed, "checkpoint_every": 1_000_000, "checkpoints_total_limit": 1, "eval_samples": 0,
            "stage1": {"steps": s1["steps"], "lr": s1["lr"], "alpha_lr": s1["alpha_lr"], "tau": 0.1,
                       "batch_size": s1["batch_size"], "query_blocks_per_step": s1["query_blocks_per_step"]},
            "stage2": {"steps": s2["steps"], "lr": s2["lr"], "weight_decay": 0.0, "warmup_steps": s2["warmup_steps"],
                       "grad_clip": 1.0, "batch_size": s2["batch_size"], "grad_accum": 1, "objective": objective,
                       "quant": stage2_quant, "gradient_checkpointing": False,
                       "timestep_shift": s2.get("timestep_shift", settings["timestep_shift"]),
                       "lr_schedule": s2.get("lr_schedule", "constant")},
        },
        "validation": {"seed": 1234, "num_samples": settings["validate_samples"], "timesteps": [900, 600, 300, 100],
                       "sample_steps": 4, "timestep_shift": settings["timestep_shift"]},  # the default gates
    }

    def keep_known(node: dict, ref: dict) -> dict:
        out = {}
        for k, v in node.items():
            if k not in ref:
                continue
            out[k] = (keep_known(v, ref[k])
                      if isinstance(v, dict) and isinstance(ref[k], dict) and k != "topk_per_layer" else v)
        return out

    known = keep_known(recipe, Recipe().to_dict(every_key=True))
    # the design choices (--sla2) go in as given: the schema, not this filter, judges them (an unknown one
    # stops the table with the schema's message, check_sla2_choices)
    known["sla2"].update(settings.get("sla2", {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(known, sort_keys=False))
    return path


def check_sla2_choices(path: Path, settings: dict, spec: sv.VideoSpec) -> None:
    """Refuse ``--sla2`` choices the installed recipe schema rejects (a value it does not know) before any
    row runs, with the schema's own message."""
    from slaconv.errors import RecipeError
    from slaconv.recipe import load_recipe

    write_recipe(path, settings, spec, topk=settings["topks"][0])
    try:
        load_recipe(path)
    except RecipeError as exc:
        raise UsageError(f"--sla2: {exc}") from None


def check_inputs(model_dir: Path, classifier_dir: Path | None, settings: dict, explicit_guidance: bool,
                 log) -> sv.VideoSpec:
    """The video spec the model was trained on, after checking that the model, its training summary, the
    judge and the guidance fit together (``settings["guidance"]`` falls back to 1 for a model trained
    without conditioning dropout, unless the guidance was asked for explicitly)."""
    cfg = read_json(model_dir / "config.json")
    spec, cond_dropout = common.trained_spec(model_dir)
    if cfg.get("in_channels") != spec.channels or cfg.get("text_dim") != spec.text_dim:
        raise InputError(f"{model_dir}: config.json does not match the video spec of its train_summary.json")
    if settings["guidance"] != 1.0 and not cond_dropout:
        if explicit_guidance:
            raise UsageError(f"{model_dir} was trained without conditioning dropout, so it has no unconditional "
                             f"velocity to guide with: pass --guidance 1")
        log(f"[spec] {model_dir} was trained without conditioning dropout: sampling unguided (guidance 1)")
        settings["guidance"] = 1.0
    if classifier_dir is not None:  # the videos the judge was trained on, whatever --frames
        metrics.require_same_videos(metrics.classifier_spec(classifier_dir), spec, f"classifier {classifier_dir}",
                                    "the model")
    return spec


def run(model_dir: Path, out: Path, *, classifier_dir: Path | None = None, smoke: bool = False,
        settings_override: dict | None = None, objective: str = "distill", validate: str = "main",
        subprocess_mode: bool = False, device: str = "auto", seed: int = 0, log=print) -> dict:
    """Build the whole table in ``out`` and return results.json's content (see the module docstring).

    ``validate``: which rows ``slaconv validate`` checks (none, first, main or all).
    """
    settings = table_settings(smoke, settings_override)
    dev = common.pick_device(device)
    total = common.Timer()
    model_dir = Path(model_dir).resolve()
    spec = check_inputs(model_dir, classifier_dir, settings, "guidance" in (settings_override or {}), log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.get("frames"):  # e.g. 1: single frames, which the original was also trained on (joint training)
        spec = dataclasses.replace(spec, frames=settings["frames"])
    log(f"[spec] {spec.frames} x {spec.size} x {spec.size} videos ({spec.tokens():,} tokens), objects "
        f"{spec.min_objects}-{spec.max_objects}, glyph scale {spec.min_scale}-{spec.max_scale}; guidance "
        f"{settings['guidance']:g}")
    cli = SlaconvCLI(subprocess_mode, str(dev), log)
    if settings.get("sla2"):
        check_sla2_choices(out / "recipes" / "choices.yaml", settings, spec)
        log(f"[sla2] every converted row: {', '.join(f'{k}={v}' for k, v in settings['sla2'].items())}")

    log(f"[data] {settings['calib_samples']} calibration videos -> {out / 'data'}")
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    sv.write_slaconv_dataset(data_dir, common.CALIB_SEED, settings["calib_samples"], spec,
                             dtype=torch.float32 if smoke else torch.float16, null_every=settings["calib_null_every"])

    ev = Evaluator(spec, settings, classifier_dir, dev, log)
    rows: list[dict] = []

    def add_row(name: str, group: str, model, *, topk=None, stage1=False, stage2=False, eval_quant=None,
                workdir: Path | None = None, extra: dict | None = None):
        res = ev(f"{group}: {name}", model)
        row = {"name": name, "group": group, "topk": topk,
               "sparsity": None if topk is None else 1 - topk, "stage1": stage1, "stage2": stage2,
               "eval_quant": eval_quant, **res}
        if workdir is not None:
            row["workdir"] = str(workdir.relative_to(out))
            row["alpha_min_mean_max"] = alpha_range(workdir)
        row.update(extra or {})
        rows.append(row)
        # a run cut short (by a time limit, say) still leaves every finished row
        common.write_json(out / "results.partial.json", {"rows": rows, "seconds": round(total(), 1)})
        del model
        release_memory(str(dev))
        return row

    log("[dense] original model")
    add_row("dense original", "dense", common.load_model(model_dir, dev))

    validations: dict[str, dict] = {}

    def validate_row(key: str, wd: Path) -> None:
        rep = cli("validate", str(wd), "--data", str(data_dir), ok_codes=(0, 4))
        validations[key] = {**rep.get("summary", {}), "passed": rep.get("passed"),
                            "convert_only": (rep.get("baselines") or {}).get("convert_only")}

    work = out / "work"
    recipes = out / "recipes"
    q = settings["quant"]
    for topk in settings["topks"]:
        tag = f"{round((1 - topk) * 100)}%"
        group = f"sparsity {tag}"
        log(f"[{group}] top-k {topk}")
        recipe = write_recipe(recipes / f"topk{topk}.yaml", settings, spec, topk=topk, objective=objective, seed=seed)
        recipe_noqat = write_recipe(recipes / f"topk{topk}-noqat.yaml", settings, spec, topk=topk, stage2_quant="none",
                                    objective=objective, seed=seed)
        base = work / f"topk{topk}" / "converted"
        conv = cli("convert", str(model_dir), "-o", str(base), "--recipe", str(recipe), "--data", str(data_dir),
                   "--overwrite")
        add_row("SLA2, no fine-tuning (convert only)", group, load_sla2(base, dev), topk=topk, eval_quant=q,
                workdir=base, extra={"convert": {"alpha_init": conv.get("alpha")}})

        s1 = copy_workdir(base, work / f"topk{topk}" / "stage1")
        r1 = cli("calibrate", str(s1), "--data", str(data_dir), "--stage", "1", "--recipe", str(recipe))
        add_row("SLA2, stage 1 only", group, load_sla2(s1, dev), topk=topk, stage1=True, eval_quant=q, workdir=s1,
                extra={"calibration": stage_summary(r1)})

        main = copy_workdir(s1, work / f"topk{topk}" / "sla2")
        r2 = cli("calibrate", str(main), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe))
        add_row("SLA2 (stage 1 + stage 2 QAT)", group, load_sla2(main, dev), topk=topk, stage1=True, stage2=True,
                eval_quant=q, workdir=main, extra={"calibration": {**stage_summary(r1), **stage_summary(r2)}})
        if validate in ("main", "all") or (validate == "first" and topk == settings["topks"][0]):
            validate_row(f"{tag} SLA2", main)

        if settings.get("rows", "all") == "main":
            continue
        no1 = copy_workdir(base, work / f"topk{topk}" / "no-stage1")
        r = cli("calibrate", str(no1), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe))
        add_row("w/o stage 1 (heuristic router), stage 2 QAT", group, load_sla2(no1, dev), topk=topk, stage2=True,
                eval_quant=q, workdir=no1, extra={"calibration": stage_summary(r)})
        if validate == "all":
            validate_row(f"{tag} w/o stage 1", no1)

        noqat = copy_workdir(s1, work / f"topk{topk}" / "no-qat")
        r = cli("calibrate", str(noqat), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe_noqat))
        add_row("w/o QAT (bf16 fine-tune), evaluated int8-fp8", group, load_sla2(noqat, dev, quant=q), topk=topk,
                stage1=True, stage2=True, eval_quant=q, workdir=noqat,
                extra={"calibration": {**stage_summary(r1), **stage_summary(r)}})
        add_row("w/o QAT, evaluated bf16 (no low-bit)", group, load_sla2(noqat, dev, quant="none"), topk=topk,
                stage1=True, stage2=True, eval_quant="none", workdir=noqat)

        sp = copy_workdir(base, work / f"topk{topk}" / "sparse-only")
        edit_sla2_state(sp, alpha_logit=PIN)
        rs1 = cli("calibrate", str(sp), "--data", str(data_dir), "--stage", "1", "--recipe", str(recipe))
        edit_sla2_state(sp, alpha_logit=PIN)  # stage 1 moved it by at most steps x lr; pin it again
        rs2 = cli("calibrate", str(sp), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe))
        add_row("sparse only (alpha = 1), stage 1 + stage 2 QAT", group, load_sla2(sp, dev), topk=topk, stage1=True,
                stage2=True, eval_quant=q, workdir=sp,
                extra={"calibration": {**stage_summary(rs1), **stage_summary(rs2)}})

    # linear only: one row, independent of the sparsity
    if settings.get("rows", "all") == "all":
        group = "linear only"
        log(f"[{group}]")
        lin_topk = 1e-6  # -> 1 key block per query block (topk_count clamps to >= 1)
        recipe = write_recipe(recipes / "linear-only.yaml", settings, spec, topk=lin_topk, objective=objective,
                              seed=seed)
        lin = work / "linear-only"
        cli("convert", str(model_dir), "-o", str(lin), "--recipe", str(recipe), "--data", str(data_dir), "--overwrite")
        edit_sla2_state(lin, alpha_logit=-PIN, zero_router=True)
        add_row("linear only (alpha = 0), no fine-tuning", group, load_sla2(lin, dev), topk=lin_topk, eval_quant=q,
                workdir=lin)
        lin_ft = copy_workdir(lin, work / "linear-only-ft")
        r = cli("calibrate", str(lin_ft), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe))
        add_row("linear only (alpha = 0), stage 2", group, load_sla2(lin_ft, dev), topk=lin_topk, stage2=True,
                eval_quant=q, workdir=lin_ft, extra={"calibration": stage_summary(r)})

    if objective == "diffusion":
        group = "dense fine-tuned"
        log(f"[{group}] top-k 1.0, alpha = 1, bf16: full attention through the SLA2 path, same stage-2 budget")
        recipe = write_recipe(recipes / "dense-ft.yaml", {**settings, "quant": "none"}, spec, topk=1.0,
                              objective=objective, seed=seed)
        dft = work / "dense-ft"
        cli("convert", str(model_dir), "-o", str(dft), "--recipe", str(recipe), "--data", str(data_dir), "--overwrite")
        edit_sla2_state(dft, alpha_logit=PIN)
        r = cli("calibrate", str(dft), "--data", str(data_dir), "--stage", "2", "--recipe", str(recipe))
        add_row("dense, stage 2 fine-tune (same budget)", group, load_sla2(dft, dev), topk=1.0, stage2=True,
                eval_quant="none", workdir=dft, extra={"calibration": stage_summary(r)})

    names = ["real data (same classes)"] + [f"{r['group']}: {r['name']}" for r in rows]
    report.save_samples(out / "samples.png", names, [ev.real] + [ev.samples[n] for n in names[1:]])
    result = {
        "settings": {**settings, "objective": objective, "seed": seed, "smoke": smoke, "device": str(dev),
                     "cli": "subprocess" if subprocess_mode else "in-process CliRunner"},
        "model": str(model_dir), "spec": spec.to_dict(), "tokens_per_sample": spec.tokens(),
        "real_data_classifier": ev.real_scores, "chance": 1 / spec.num_classes,
        "rows": rows, "validate": validations, "cli_calls": cli.calls,
        "seconds_total": round(total(), 1), "env": common.env_summary(),
    }
    report.write_results(out, result)
    log(f"wrote {out / 'results.md'}, results.json, samples.png in {total():.0f} s")
    return result


def settings_from_args(args: argparse.Namespace) -> dict:
    """The settings override that the command line asks for (only what was given)."""
    over: dict = {"stage1": {}, "stage2": {}}
    if args.topk:
        over["topks"] = args.topk
    for flag, stage, key in (("stage1_steps", "stage1", "steps"), ("stage1_lr", "stage1", "lr"),
                             ("stage2_steps", "stage2", "steps"), ("stage2_batch_size", "stage2", "batch_size"),
                             ("stage2_lr", "stage2", "lr"), ("stage2_lr_schedule", "stage2", "lr_schedule"),
                             ("calib_shift", "stage2", "timestep_shift")):
        if getattr(args, flag) is not None:
            over[stage][key] = getattr(args, flag)
    for key in ("block_q", "guidance", "rows", "frames", "heldout_samples", "sample_steps", "sample_per_class",
                "calib_samples"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    if args.sla2:
        over["sla2"] = dict(sla2_setting(text) for text in args.sla2)
    return over


SLA2_ROW_KEYS = ("feature_map", "mixing", "linear_keys", "budget", "token_tile")
"""The ``sla2`` recipe keys ``--sla2`` may set: the design choices.  Top-k, blocks and quantisation are the
table's own axes and have their own flags."""


def sla2_setting(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--sla2`` -> (key, value), for one of :data:`SLA2_ROW_KEYS`."""
    key, eq, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not value:
        raise UsageError(f"--sla2 {text!r}: expected KEY=VALUE, e.g. feature_map=hedgehog")
    if key not in SLA2_ROW_KEYS:
        raise UsageError(f"--sla2 {text!r}: {key!r} is not one of {', '.join(SLA2_ROW_KEYS)}")
    return key, value


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--objective", choices=["distill", "diffusion"], default="distill")
    ap.add_argument("--topk", type=fraction, action="append", help="override the sparsities (repeat)")
    ap.add_argument("--stage1-steps", type=positive_int)
    ap.add_argument("--stage1-lr", type=positive_float)
    ap.add_argument("--stage2-steps", type=positive_int)
    ap.add_argument("--stage2-batch-size", type=positive_int)
    ap.add_argument("--stage2-lr", type=positive_float)
    ap.add_argument("--stage2-lr-schedule", choices=LR_SCHEDULES,
                    help="stage 2's learning rate after the warm-up (default constant)")
    ap.add_argument("--calib-shift", type=positive_float,
                    help="timestep shift of the calibration noise levels (recipe calibration.stage2.timestep_shift, "
                         "which stage 1's sampler reads too; default: the sampling shift; 1 = uniform sigma, which "
                         "weights low noise as the held-out loss does)")
    ap.add_argument("--block-q", type=int, choices=[64, 128])
    ap.add_argument("--guidance", type=non_negative_float,
                    help=f"classifier-free guidance of every row's samples (default {common.SAMPLE_GUIDANCE}; "
                         "1 = unguided, needed for a model trained without conditioning dropout)")
    ap.add_argument("--validate", choices=["none", "first", "main", "all"],
                    help="run `slaconv validate` on: the first sparsity's SLA2 row, every SLA2 row (main), every "
                         "row, or none (default: main; first with --smoke)")
    ap.add_argument("--rows", choices=["all", "main", "ablations"],
                    help="all: every ablation row (default); main: dense, convert only, stage 1, SLA2 (the demo); "
                         "ablations: every per-sparsity row, without the linear-only rows")
    ap.add_argument("--frames", type=positive_int,
                    help="frames per video instead of the trained spec's (1: single frames, which the original "
                         "was also trained on)")
    ap.add_argument("--heldout-samples", type=positive_int)
    ap.add_argument("--sample-steps", type=positive_int)
    ap.add_argument("--sample-per-class", type=positive_int)
    ap.add_argument("--calib-samples", type=positive_int)
    ap.add_argument("--sla2", action="append", metavar="KEY=VALUE",
                    help="a design choice for every converted row (repeat): feature_map=hedgehog, mixing=query, "
                         "budget=per_layer; default: the paper's configuration")
    ap.add_argument("--subprocess", action="store_true", help="run `python -m slaconv` instead of in-process CliRunner")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        res = run(args.model, args.out, classifier_dir=args.classifier, smoke=args.smoke,
                  settings_override=settings_from_args(args), objective=args.objective,
                  validate=args.validate or ("first" if args.smoke else "main"), subprocess_mode=args.subprocess,
                  device=args.device, seed=args.seed)
    except StepFailed as exc:
        print(exc.output, file=sys.stderr)  # the failed step's own output, above the one-line error
        raise
    print(report.markdown(res))


if __name__ == "__main__":
    main()
