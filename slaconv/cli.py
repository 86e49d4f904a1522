"""The ``slaconv`` command line: one Click group, one verb per pipeline stage.

Every verb works on a work directory that the previous verb wrote, so Makefiles can chain them:
``convert`` -> ``calibrate`` -> ``validate`` -> ``push``.  User mistakes end with one line on
stderr (``error: ...``) and a documented exit code; see ``slaconv --help``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from . import __version__
from .command_group import INTERRUPTED_EXIT_CODE, SlaconvGroup
from .config import BLOCK_SIZES, FEATURE_MAPS, KERNEL_HEAD_DIMS, LINEAR_KEYS, MIXINGS, QUANT_MODES
from .errors import EXIT_CODES
from .recipe import OBJECTIVES

EPILOG = "Exit codes:\n\n" + "\n\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _emit(ctx: click.Context, data: dict, human: str) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch only rank 0 reports
        return
    if ctx.obj.get("json"):
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human)


class DeviceType(click.ParamType):
    """A ``--device`` value, checked while the command line is parsed (before anything loads): a name torch does
    not know or slaconv does not run on exits 2, a GPU this machine lacks exits 3."""

    name = "device"

    def convert(self, value, param, ctx):
        from .utils.devices import resolve_device

        return resolve_device(value)


def _recipe(recipe_path, work, overrides: dict):
    """The recipe: ``--recipe``, else the work dir's resolved one, else the defaults; then the flags."""
    from .recipe import load_recipe

    if recipe_path is None and work is not None and work.recipe_path.is_file():
        recipe_path = work.recipe_path
    return load_recipe(recipe_path, overrides)


def _workdir(path: str):
    from .workdir import WorkDir

    return WorkDir.open(path)


def _resume_command(ctx: click.Context) -> str:
    """The command line that resumes the interrupted command of ``ctx``: the options the user gave (global
    ones that matter too), ``--resume latest`` in place of any ``--resume``."""
    def given(context, skip=()):
        words = []
        for param in context.command.params:
            source = context.get_parameter_source(param.name)
            value = context.params.get(param.name)
            if param.name in skip or source != click.core.ParameterSource.COMMANDLINE or value in (None, False):
                continue
            if isinstance(param, click.Argument):
                words.append(str(value))
            elif param.is_flag:
                words.append(max(param.opts, key=len))
            else:
                words += [max(param.opts, key=len), str(value)]
        return words

    root = ctx.find_root()
    words = ["slaconv", *given(root, skip=("quiet", "verbose")), ctx.info_name,
             *given(ctx, skip=("resume", "overwrite", "dry_run")), "--resume", "latest"]
    return shlex.join(words)


def _int_choice(ctx, param, value):
    """A numeric click.Choice's value as an int."""
    return None if value is None else int(value)


def _token_tile(ctx, param, value):
    """``--token-tile 4x4x4`` as the recipe's list [4, 4, 4]."""
    from .errors import RecipeError
    from .token_order import parse_tile

    try:
        return None if value is None else list(parse_tile(value))
    except RecipeError as exc:
        raise click.BadParameter(str(exc)) from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout (for scripts).")
recipe_option = click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe YAML; flags override it.")
device_option = click.option("--device", type=DeviceType(), default="auto", show_default=True,
                             help="auto, cpu, cuda, cuda:N.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Resolve everything and report the plan; change nothing.")


def _common(ctx, as_json):
    ctx.obj["json"] = ctx.obj.get("json") or as_json


@click.group(cls=SlaconvGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slaconv")
@click.option("--offline", is_flag=True, help="Never touch the network (Hub cache and local paths only).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or progress lines: warnings and errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Also log details (debug messages).")
@click.pass_context
def main(ctx, offline, quiet, verbose):
    """Convert diffusers Diffusion Transformers to SLA2 sparse-linear attention."""
    from .utils.logs import configure_logging

    ctx.ensure_object(dict)
    ctx.obj.update(offline=offline, quiet=quiet)
    configure_logging(quiet=quiet, verbose=verbose)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


@main.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Work dir to write.")
@click.option("--subfolder", help="Folder inside MODEL holding the transformer (e.g. 'transformer').")
@click.option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")
@click.option("--topk", type=float, help="Fraction of key blocks kept per query block (sla2.topk).")
@click.option("--block-q", type=click.Choice([str(b) for b in BLOCK_SIZES]), callback=_int_choice,
              help="Query block size (sla2.block_q).")
@click.option("--block-k", type=click.Choice([str(b) for b in BLOCK_SIZES]), callback=_int_choice,
              help="Key block size (sla2.block_k).")
@click.option("--quant", type=click.Choice(QUANT_MODES), help="Low-bit mode of the sparse branch.")
@click.option("--feature-map", type=click.Choice(FEATURE_MAPS), help="Linear-branch feature map (sla2.feature_map).")
@click.option("--mixing", type=click.Choice(MIXINGS),
              help="Alpha per head, per query from the tail mass, per query from the query, or per query from "
                   "the query and its block's tail mass (sla2.mixing).")
@click.option("--linear-keys", type=click.Choice(LINEAR_KEYS),
              help="Keys of the linear branch: the unselected ones or all (sla2.linear_keys).")
@click.option("--token-tile", metavar="FxHxW", callback=_token_tile,
              help="Regroup the video tokens into tiles of F frames x H rows x W columns, e.g. 4x4x4 "
                   "(sla2.token_tile).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="Calibration data for the alpha pass.")
@click.option("--overwrite", is_flag=True, help="Replace an existing work dir at OUTPUT.")
@click.option("--seed", type=int, help="Seed (calibration.seed).")
@recipe_option
@device_option
@dry_run_option
@json_option
@click.pass_context
def convert(ctx, model, output, subfolder, revision, topk, block_q, block_k, quant, feature_map, mixing, linear_keys,
            token_tile, data_dir, overwrite, seed, recipe, device, dry_run, as_json):
    """Install SLA2 on MODEL (Hub id or local folder) and write a work dir."""
    from . import convert as stage
    from .token_order import describe

    _common(ctx, as_json)
    rec = _recipe(recipe, None, {"sla2.topk": topk, "sla2.block_q": block_q, "sla2.block_k": block_k,
                                 "sla2.quant": quant, "sla2.feature_map": feature_map, "sla2.mixing": mixing,
                                 "sla2.linear_keys": linear_keys, "sla2.token_tile": token_tile,
                                 "calibration.seed": seed})
    if dry_run:
        plan = stage.plan(model, rec, subfolder=subfolder, revision=revision, offline=ctx.obj["offline"])
        _emit(ctx, {"dry_run": True, **plan},
              f"would convert {plan['num_layers']} {plan['family']} layers of {model} "
              f"(topk {rec.sla2.topk}, blocks {rec.sla2.block_q}x{rec.sla2.block_k}, "
              f"quant {rec.sla2.quant}, feature map {rec.sla2.feature_map}, mixing {rec.sla2.mixing}, "
              f"linear keys {rec.sla2.linear_keys}, token order {describe(rec.sla2.token_tile)}):\n  "
              + "\n  ".join(plan["layers"]))
        return
    out = stage.convert(model, Path(output), rec, subfolder=subfolder, revision=revision, offline=ctx.obj["offline"],
                        overwrite=overwrite, data_dir=data_dir, device=device)
    text = f"converted {len(out['layers'])} layers of {model} ({out['family']}) -> {output}"
    mass = out["selected_mass"]
    if mass is not None:
        text += (f"\nthe initial router's blocks hold {mass['mean']:.0%} of the full attention mass (lowest layer "
                 f"{mass['lowest_layer']}: {mass['lowest_layer_mean']:.0%}); calibration must recover the rest, "
                 f"and the less the blocks hold, the more quality is at stake")
    _emit(ctx, out, text)


@main.command()
@click.argument("workdir")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="Calibration data folder (else data-free).")
@click.option("--stage", type=click.Choice(["1", "2", "all"]), default="all", show_default=True,
              help="1: router and alpha; 2: end-to-end fine-tuning (QAT); all: 1 then 2.")
@click.option("--steps", type=int, help="Steps of the selected stage(s).")
@click.option("--lr", type=float, help="Learning rate of the selected stage(s) (stage 1: the router's).")
@click.option("--alpha-lr", type=float, help="Stage-1 learning rate of the alpha logits.")
@click.option("--objective", type=click.Choice(OBJECTIVES), help="Stage-2 objective.")
@click.option("--batch-size", type=int, help="Batch size of the selected stage(s).")
@click.option("--seed", type=int, help="Seed (calibration.seed).")
@click.option("--resume", help="'latest' (this run's last checkpoint; a stage it completed is skipped) or a "
                               "checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Discard the checkpoints of another, unfinished run and start afresh.")
@recipe_option
@device_option
@dry_run_option
@json_option
@click.pass_context
def calibrate(ctx, workdir, data_dir, stage, steps, lr, alpha_lr, objective, batch_size, seed, resume, overwrite,
              recipe, device, dry_run, as_json):
    """Stage 1 (router + alpha) and/or stage 2 (QAT fine-tune) on a work dir.

    A run is one stage with one recipe from one starting point: --resume continues only the same run, and a
    new run refuses to start over another run's unfinished checkpoints unless --overwrite.  Each stage keeps
    the best state its held-out score reached; one that ends worse than it started exits 6 and leaves the
    weights as they were."""
    from . import calibrate as stages

    _common(ctx, as_json)
    wd = _workdir(workdir)
    overrides = {"calibration.seed": seed, "calibration.stage2.objective": objective,
                 "calibration.stage1.alpha_lr": alpha_lr}
    for s in (["stage1", "stage2"] if stage == "all" else [f"stage{stage}"]):
        overrides.update({f"calibration.{s}.steps": steps, f"calibration.{s}.lr": lr,
                          f"calibration.{s}.batch_size": batch_size})
    rec = _recipe(recipe, wd, overrides)
    if data_dir is not None:
        from .data import CalibrationDataset

        CalibrationDataset(data_dir)  # checks the whole folder up front
    if dry_run:
        calibration = rec.calibration.to_dict()
        _emit(ctx, {"dry_run": True, "work_dir": str(wd), "stage": stage, "recipe": calibration},
              f"would run stage {stage} on {wd}:\n" + json.dumps(calibration, indent=2))
        return
    try:
        out = stages.calibrate(wd, rec, stage=stage, data_dir=data_dir, resume=resume, device=device,
                               show_progress=not ctx.obj["quiet"], overwrite=overwrite)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            launcher = " (under the same launcher)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            click.echo(f"interrupted; the checkpoints are kept{launcher}, resume with: {_resume_command(ctx)}",
                       err=True)
        ctx.exit(INTERRUPTED_EXIT_CODE)
    lines = [f"calibrated {wd}"]
    def fmt(x):
        return "n/a" if x is None else f"{x:.4g}"

    if "stage1" in out:
        s1 = out["stage1"]
        lines.append(f"  stage 1: {s1['steps']} steps; held-out attention rel. MSE "
                     f"{fmt(s1['heldout_attention_rel_mse_before'])} -> {fmt(s1['heldout_attention_rel_mse_after'])}")
    if "stage2" in out:
        s2 = out["stage2"]
        lines.append(f"  stage 2: {s2['steps']} steps ({s2['objective']}, {s2['quant']}); held-out loss "
                     f"{fmt(s2['heldout_loss_before'])} -> {fmt(s2['heldout_loss_after'])}")
    _emit(ctx, out, "\n".join(lines))


@main.command()
@click.argument("workdir")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="Inputs from a data folder (else synthetic).")
@click.option("--base", help="The original model (default: the one recorded at convert time).")
@click.option("--num-samples", type=click.IntRange(min=1), help="Samples compared (default: validation.num_samples).")
@click.option("--seed", type=int, help="Seed (validation.seed).")
@click.option("--quant", type=click.Choice(QUANT_MODES), help="Validate in this low-bit mode.")
@recipe_option
@device_option
@json_option
@click.pass_context
def validate(ctx, workdir, data_dir, base, num_samples, seed, quant, recipe, device, as_json):
    """Compare the SLA2 model with the original; non-zero exit when a quality gate fails."""
    from . import validate as stage
    from .errors import QualityGateError
    from .validation_report import terminal_summary

    _common(ctx, as_json)
    wd = _workdir(workdir)
    rec = _recipe(recipe, wd, {"validation.num_samples": num_samples, "validation.seed": seed})
    try:
        report = stage.validate(wd, rec, data_dir=data_dir, base=base, device=device, quant=quant)
    except QualityGateError:
        report = wd.read_validation_report()
        _emit(ctx, report, terminal_summary(wd, report))
        raise
    _emit(ctx, report, terminal_summary(wd, report))


@main.command()
@click.argument("workdir")
@click.option("--repo-id", required=True, help="ORG/NAME on the Hub.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--commit-message", help="Commit message (default: 'Upload SLA2 model with slaconv VERSION').")
@click.option("--token", envvar="HF_TOKEN", help="Hub token (default: HF_TOKEN or the cached login).")
@click.option("--allow-failed-validation", is_flag=True, help="Push even though `validate` failed a quality gate.")
@click.option("--allow-unvalidated", is_flag=True,
              help="Push without a current validation (never validated, or the weights changed since); the model "
                   "card then says 'not validated'.")
@dry_run_option
@json_option
@click.pass_context
def push(ctx, workdir, repo_id, private, revision, create_pr, commit_message, token, allow_failed_validation,
         allow_unvalidated, dry_run, as_json):
    """Package WORKDIR (model card, checksums) and upload it to the Hub.

    Refused (exit 9) unless a validation measured exactly these weights, and (exit 4) if that validation failed."""
    from .push import push as do_push

    _common(ctx, as_json)
    wd = _workdir(workdir)
    if ctx.obj["offline"] and not dry_run:
        from .errors import HubError

        raise HubError("push needs the network; drop --offline (or use --dry-run)")
    out = do_push(wd.path, repo_id, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, token=token, dry_run=dry_run, allow_unvalidated=allow_unvalidated,
                  allow_failed_validation=allow_failed_validation)
    files = out.get("files", [])
    if dry_run:
        human = f"dry run: would upload {len(files)} files to {repo_id}:\n  " + "\n  ".join(map(str, files))
    else:
        human = f"pushed {len(files)} files to {repo_id}: {out.get('pr_url') or out.get('commit_url')}"
    _emit(ctx, out, human)


@main.command("inspect")
@click.argument("target")
@click.option("--revision", help="Hub revision when TARGET is a repo id.")
@json_option
@click.pass_context
def inspect_cmd(ctx, target, revision, as_json):
    """What a work dir or Hub repo holds: layers, sparsity, alpha per head, summaries."""
    from .inspect import inspect_target, render

    _common(ctx, as_json)
    info = inspect_target(target, revision=revision)
    _emit(ctx, info, render(info))


@main.command("env")
@json_option
@click.pass_context
def env_cmd(ctx, as_json):
    """Versions, GPUs, attention backend and settings: paste this into a bug report."""
    from .envinfo import collect, render

    _common(ctx, as_json)
    info = collect()
    _emit(ctx, info, render(info))


@main.command("synth-data")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--model", "model", required=True, help="Work dir or model folder whose config sets channels/text dim.")
@click.option("--num-samples", default=8, show_default=True, type=click.IntRange(min=1), help="Samples to write.")
@click.option("--frames", type=int, help="Latent frames (default: recipe data.frames).")
@click.option("--height", type=int, help="Latent height.")
@click.option("--width", type=int, help="Latent width.")
@click.option("--text-len", type=int, help="Text tokens.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random latents and embeddings.")
@recipe_option
@json_option
@click.pass_context
def synth_data(ctx, output, model, num_samples, frames, height, width, text_len, seed, recipe, as_json):
    """Write a small synthetic calibration set in the --data format."""
    from .families import detect_family
    from .source import resolve_model
    from .synthetic_data import write_synthetic_dataset
    from .workdir import WorkDir

    _common(ctx, as_json)
    src = resolve_model(model)
    family = detect_family(src.config)
    rec = _recipe(recipe, WorkDir(model), {"data.frames": frames, "data.height": height, "data.width": width,
                                           "data.text_len": text_len})
    d = rec.data
    path = write_synthetic_dataset(output, num_samples=num_samples, channels=family.latent_channels(src.config),
                                   frames=d.frames, height=d.height, width=d.width,
                                   text_len=d.text_len, text_dim=family.text_dim(src.config), seed=seed,
                                   pooled_dim=family.pooled_dim(src.config) or 0, prompt_mask=family.text_mask)
    _emit(ctx, {"data_dir": str(path), "num_samples": num_samples},
          f"wrote {num_samples} synthetic samples to {path}")


@main.command()
@click.option("--out", "out_dir", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's model, data and work dir.")
@click.option("--fresh", is_flag=True, help="Delete OUT first.")
@json_option
@click.pass_context
def demo(ctx, out_dir, fresh, as_json):
    """The whole pipeline on a built-in tiny Wan model: convert, calibrate, validate, push (dry run)."""
    from .demo import run_demo

    _common(ctx, as_json)
    result = run_demo(Path(out_dir), fresh=fresh, show_progress=not ctx.obj["quiet"],
                      log=(lambda m: click.echo(m, err=True)) if ctx.obj.get("json") else click.echo)
    _emit(ctx, result, result["table"])


@main.command()
@click.option("--seq-len", default=32760, show_default=True, type=click.IntRange(min=1),
              help="Tokens N (32,760: Wan2.1-1.3B at 480p).")
@click.option("--heads", default=12, show_default=True, type=click.IntRange(min=1), help="Attention heads H.")
@click.option("--head-dim", default=128, show_default=True, type=click.Choice([str(d) for d in KERNEL_HEAD_DIMS]), callback=_int_choice,
              help="Head dim D.")
@click.option("--topk", "topks", multiple=True, type=click.FloatRange(0, 1, min_open=True),
              default=(0.10, 0.05, 0.03), show_default=True, help="Fractions of key blocks kept (repeatable).")
@click.option("--quant", "quants", multiple=True, type=click.Choice(QUANT_MODES), default=QUANT_MODES,
              show_default=True, help="Low-bit modes to time (repeatable).")
@json_option
@click.pass_context
def bench(ctx, seq_len, heads, head_dim, topks, quants, as_json):
    """SLA2 attention speed against dense SDPA (cuDNN and FlashAttention) on this GPU."""
    from .bench import bench_attention, render_table

    _common(ctx, as_json)
    rows = bench_attention(seq_len=seq_len, heads=heads, head_dim=head_dim, topks=topks, quants=quants)
    _emit(ctx, {"rows": rows}, render_table(rows))


@main.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--pipeline", required=True, help="Diffusers Wan pipeline folder or Hub id (only vae/, text_encoder/, "
                                                "tokenizer/ are read).")
@click.option("--captions", required=True, type=click.Path(),
              help="JSONL ({\"file\", \"caption\"} per line), CSV (file,caption) or a folder of media + same-named .txt.")
@click.option("--media-dir", type=click.Path(file_okay=False), help="Where relative 'file' entries live "
                                                                   "(default: the captions file's folder).")
@click.option("--height", default=480, show_default=True, help="Frame height (multiple of 16).")
@click.option("--width", default=832, show_default=True, help="Frame width (multiple of 16).")
@click.option("--num-frames", default=81, show_default=True, help="Frames per sample, 4k+1 (images: 1, or repeated).")
@click.option("--max-sequence-length", default=512, show_default=True, help="Text tokens (padded with zeros).")
@click.option("--revision", help="Hub revision when --pipeline is a repo id.")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Text-encoder and stored dtype (the VAE always runs in float32).")
@click.option("--seed", default=0, show_default=True, help="Recorded in the manifest (encoding is deterministic).")
@dry_run_option
@json_option
@click.pass_context
def prepare(ctx, output, pipeline, captions, media_dir, height, width, num_frames, max_sequence_length, revision,
            device, dtype, seed, dry_run, as_json):
    """Encode videos/images + captions into a --data folder with a Wan pipeline's VAE and text encoder."""
    from . import prepare as stage

    _common(ctx, as_json)
    kwargs = dict(pipeline=pipeline, captions=captions, media_dir=media_dir, height=height, width=width,
                  num_frames=num_frames, max_sequence_length=max_sequence_length, revision=revision,
                  offline=ctx.obj["offline"])
    if dry_run:
        p = stage.plan(output, **kwargs)
        rows = [f"{r['file']} [{r['kind']}, {r['frames'] if r['frames'] is not None else '?'} frame(s)]: "
                f"{r['caption'][:60]}" for r in p["items"]]
        note = "" if p["output_ok"] else f"\n(note: {output} is not empty; the real run would refuse it)"
        _emit(ctx, {"dry_run": True, **p},
              f"would encode {p['num_samples']} samples with {pipeline} -> {output} "
              f"(latents {p['latent_shape']}, prompt_embeds {p['text_shape']}):\n  " + "\n  ".join(rows) + note)
        return
    out = stage.prepare_dataset(output, device=device, dtype=dtype, seed=seed,
                                show_progress=not ctx.obj["quiet"], **kwargs)
    _emit(ctx, out, f"wrote {out['num_samples']} samples to {out['data_dir']} "
                    f"(latents {out['latent_shape']}, prompt_embeds {out['text_shape']}, {out['dtype']})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
