"""Stage 2 on two GPUs through the real CLI: data-parallel loss-curve match on Wan2.1-1.3B at 480p, and
the Wan2.1-14B architecture (a slice of its 40 layers) at 720p under FSDP.

Random bf16 weights built from the Hub configs (bench_model.py), saved as diffusers folders, then only
the real CLI: `slaconv convert` with the shipped recipes, shortened, and `slaconv calibrate --stage 2`:

1. Wan2.1-1.3B, 480p latents 1x16x21x60x104 (32,760 tokens), the same global batch of 2 two ways:
   (a) one process with --batch-size 2 (GPU 0), (b) `accelerate launch --multi_gpu --num_processes 2`
   with --batch-size 1 (DDP).  calibrate's sampler gives process r of N the samples
   step*B*N + r*B + j, so (a) and (b) see the same samples, noise and timesteps; the learning rate is the
   recipe's 1e-5 held constant (no warm-up), so every step updates the weights and bf16 / low-bit
   rounding is the only expected difference.  Reported: per-step loss of both, max relative
   difference (a match if <= --tolerance, 2e-2), held-out loss, per-GPU peak memory, s/step.
2. Wan2.1-14B architecture with --fsdp-layers of its 40 blocks, 720p latents 1x16x21x90x160 (75,600
   tokens), FSDP from benchmarks/accelerate_fsdp.yaml over 2 GPUs (FULL_SHARD, one unit per
   WanTransformerBlock), gradient checkpointing, --fsdp-steps steps: per-rank peak memory, s/step, and
   the saved tensors (names, shapes, dtypes of every *.safetensors) against the convert output and a
   one-process stage-2 save of the same model (one step at a small resolution on GPU 1).

Work that needs one GPU runs on GPU 0 and GPU 1 at the same time.  The whole run keeps to --budget-s;
a run cut off by it keeps the steps its log already holds.  Writes bench_multigpu.json, .md and
bench_multigpu_logs.txt to --out and prints the table.

    python benchmarks/bench_multigpu.py --out OUT                 # 2 GPUs
    python benchmarks/bench_multigpu.py --out OUT --cpu           # the same logic on tiny models, CPU processes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
from bench_model import COMMON, CONFIGS, LATENTS  # noqa: E402

FSDP_CONFIG = HERE / "accelerate_fsdp.yaml"
RECIPES = {"1.3b": ROOT / "recipes" / "wan2.1-t2v-1.3b-480p.yaml", "14b": ROOT / "recipes" / "wan2.1-t2v-14b-720p.yaml"}
# --cpu: tiny Wan models (head dim 64, so the same block sizes apply) and tiny latents.
TINY_MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=256, ffn_dim=64, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6, rope_max_seq_len=32)
TINY_LAYERS = {"1.3b": 2, "14b": 3}
TINY_DATA = {"frames": 2, "height": 16, "width": 16, "text_len": 8}
REF_DATA = {"frames": 5, "height": 32, "width": 32}  # the one-process format reference: 1,280 tokens


# ------------------------------------------------------------------------------------------------ jobs


class Job:
    """A subprocess in its own process group (a timeout ends a launcher and all its workers), its
    stdout and stderr in files (several jobs run at once without filling pipes)."""

    def __init__(self, name: str, cmd: list[str], logs: Path, env: dict | None = None):
        self.name, self.cmd = name, [str(c) for c in cmd]
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        self.t0 = time.time()
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def wait(self, deadline: float) -> dict:
        """Wait until ``deadline`` (epoch seconds), then kill; returns what happened and the JSON printed."""
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill()
            rc = self.proc.returncode
        return {"name": self.name, "cmd": " ".join(self.cmd), "rc": rc, "timed_out": timed_out,
                "wall_s": round(time.time() - self.t0, 1), "json": _last_json(self.out.read_text())}

    def _kill(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=grace)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue

    def stderr_tail(self, chars: int = 6000) -> str:
        return self.err.read_text(errors="replace")[-chars:]


def _last_json(text: str):
    """The JSON object a CLI printed last (``--json`` output starts with a line holding only '{')."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if not starts:
        return None
    try:
        return json.loads("\n".join(lines[starts[-1]:]))
    except json.JSONDecodeError:
        return None


class Runner:
    """Starts jobs, keeps the total run within its budget, and collects every job's record and log."""

    def __init__(self, work: Path, budget_s: float):
        self.logs = work / "joblogs"
        self.logs.mkdir(parents=True)
        self.t0, self.budget_s = time.time(), budget_s
        self.deadline = self.t0 + budget_s
        self.records: list[dict] = []
        self.jobs: list[Job] = []

    def start(self, name: str, cmd: list, env: dict | None = None) -> Job:
        job = Job(name, cmd, self.logs, env)
        self.jobs.append(job)
        return job

    def finish(self, job: Job, cap_s: float, by: float = 1.0) -> dict:
        """Wait for ``job`` at most ``cap_s`` from now and never past the fraction ``by`` of the budget
        (what is left after it belongs to the later jobs)."""
        record = job.wait(min(time.time() + cap_s, self.t0 + by * self.budget_s))
        record["ok"] = record["rc"] == 0 and not record["timed_out"] and record["json"] is not None
        if not record["ok"]:
            record["stderr_tail"] = job.stderr_tail(1500)
        self.records.append(record)
        print(f"[{time.time() - self.t0:6.1f} s] {job.name}: {'ok' if record['ok'] else 'FAILED'} "
              f"in {record['wall_s']} s", flush=True)
        return record

    def left(self) -> float:
        return self.deadline - time.time()

    def combined_log(self, per_job_chars: int = 60_000) -> str:
        parts = []
        for job in self.jobs:
            parts.append(f"===== {job.name}: {' '.join(job.cmd)}\n----- stdout (tail)\n"
                         f"{job.out.read_text(errors='replace')[-per_job_chars // 4:]}\n----- stderr (tail)\n"
                         f"{job.stderr_tail(per_job_chars)}\n")
        return "".join(parts)


# ------------------------------------------------------------------------------------------------ inputs


def build_base(model: str, layers: int, dst: Path, cpu: bool) -> dict:
    """A random-weight Wan transformer of the real architecture (or a tiny one with --cpu), saved in bf16."""
    import torch
    from diffusers import WanTransformer3DModel

    cfg = {**TINY_MODEL, "num_layers": layers} if cpu else {**COMMON, **CONFIGS[model], "num_layers": layers}
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        net = WanTransformer3DModel(**cfg)
    net.to(torch.bfloat16).save_pretrained(dst)
    return {"device": "cpu" if cpu else torch.cuda.get_device_name(), "layers": layers,
            "params_billion": round(sum(p.numel() for p in net.parameters()) / 1e9, 3)}


def write_recipe(model: str, dst: Path, *, steps: int, cpu: bool, data: dict | None = None,
                 eval_samples: int = 1) -> Path:
    """The shipped recipe, shortened: stage 2 for ``steps`` steps at batch 1 without accumulation, the
    recipe's learning rate held constant from step 1 (no warm-up), no checkpoints."""
    import yaml

    recipe = yaml.safe_load(RECIPES[model].read_text())
    recipe["calibration"]["stage2"].update(steps=steps, warmup_steps=0, grad_accum=1, batch_size=1)
    recipe["calibration"].update(checkpoint_every=1_000_000, eval_samples=eval_samples)
    recipe["data"].update({**(TINY_DATA if cpu else {}), **(data or {})})
    dst.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return dst


def tensor_layout(folder: Path) -> dict:
    """{file: {tensor: [shape, dtype]}} of every safetensors file in ``folder`` (headers only)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out[f.name] = {k: [list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()] for k in fh.keys()}
    return out


def layout_difference(a: dict, b: dict) -> str | None:
    """None when two layouts are equal, else the first difference in words."""
    if set(a) != set(b):
        return f"files differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        if set(a[name]) != set(b[name]):
            return f"{name}: tensors differ, e.g. {sorted(set(a[name]) ^ set(b[name]))[:3]}"
        for key, spec in a[name].items():
            if spec != b[name][key]:
                return f"{name}: {key} is {spec} vs {b[name][key]}"
    return None


# ------------------------------------------------------------------------------------------------ reading results


def curve(record: dict, workdir: Path) -> list[dict]:
    """Per-step records: from the run's --json, or from its log when the run was cut off."""
    if record.get("json") and "loss_curve" in record["json"]:
        return record["json"]["loss_curve"]["stage2"]
    log = workdir / "logs" / "stage2.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if x] if log.exists() else []


def step_seconds(points: list[dict]) -> dict:
    """Seconds of step 1 (Triton compilation, allocator warm-up) and the median of the later steps."""
    secs = [p["seconds"] for p in points if "seconds" in p]
    return {"first_step_s": secs[0] if secs else None,
            "s_per_step": round(statistics.median(secs[1:]), 3) if len(secs) > 1 else None}


def compare_curves(a: list[dict], b: list[dict], tolerance: float) -> dict:
    """Per-step relative difference |a - b| / |a| over the steps both runs logged."""
    steps = min(len(a), len(b))
    rel = [abs(a[i]["loss"] - b[i]["loss"]) / max(abs(a[i]["loss"]), 1e-30) for i in range(steps)]
    losses = [p["loss"] for p in a[:steps]]
    spread = (max(losses) - min(losses)) / max(min(losses), 1e-30) if losses else None
    return {"steps_compared": steps, "rel_diff": rel, "max_rel_diff": max(rel) if rel else None,
            "step1_rel_diff": rel[0] if rel else None, "tolerance": tolerance,
            "curve_spread_rel": spread, "match": bool(rel) and max(rel) <= tolerance}


def stage2(record: dict) -> dict:
    return (record.get("json") or {}).get("stage2") or {}


# ------------------------------------------------------------------------------------------------ the run


def _slaconv(*args) -> list:
    return [sys.executable, "-m", "slaconv", "-q", *args, "--json"]


def _launch(*launch_args) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args]


def _build_cmd(model: str, layers: int, dst: Path, cpu: bool) -> list:
    return [sys.executable, __file__, "--build", model, "--layers", layers, "--dst", dst, *(["--cpu"] if cpu else [])]


class Plan:
    """Paths, recipes and commands of one benchmark run."""

    def __init__(self, args):
        self.args, self.cpu, w = args, args.cpu, args.work
        self.env = {"OMP_NUM_THREADS": "1"} if args.cpu else {}
        self.layers13 = TINY_LAYERS["1.3b"] if args.cpu else CONFIGS["1.3b"]["num_layers"]
        self.layers14 = TINY_LAYERS["14b"] if args.cpu else args.fsdp_layers
        # job caps were set for 12 blocks; a deeper slice gets proportionally longer (build, convert, FSDP)
        self.scale14 = max(1.0, self.layers14 / 12)
        # the one-process format reference trains the whole slice on one GPU: 12 blocks took 91 GB
        self.format_ref = args.cpu or self.layers14 <= 12
        self.base13, self.base14, self.conv13, self.conv14 = w / "base13", w / "base14", w / "conv13", w / "conv14"
        self.one13, self.two13 = w / "w13_1proc", self.conv13  # the 2-process run works in the converted dir
        self.fsdp14, self.ref14 = self.conv14, w / "w14_1proc"
        self.r13 = write_recipe("1.3b", w / "recipe13.yaml", steps=args.steps, cpu=args.cpu)
        self.r14 = write_recipe("14b", w / "recipe14.yaml", steps=args.fsdp_steps, cpu=args.cpu)
        self.r14_ref = write_recipe("14b", w / "recipe14_ref.yaml", steps=1, cpu=args.cpu, eval_samples=0,
                                    data=None if args.cpu else REF_DATA)

    def gpu(self, i: int) -> dict:
        """Environment of a one-GPU job on GPU ``i``."""
        return dict(self.env) if self.cpu else {"CUDA_VISIBLE_DEVICES": str(i)}

    def ddp_cmd(self) -> list:
        return _launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "bf16",
                       "--dynamo_backend", "no", "-m", "slaconv", "-q", "calibrate", self.two13, "--stage", "2",
                       "--batch-size", "1", "--json")

    def fsdp_cmd(self) -> list:
        # CPU processes go through the test shim: accelerate enables FSDP for GPU process groups only
        target = [ROOT / "tests" / "fsdp_cpu_launch.py"] if self.cpu else ["-m", "slaconv"]
        return _launch("--config_file", FSDP_CONFIG, "--num_processes", str(self.args.fsdp_processes), *target,
                       "-q", "calibrate", self.fsdp14, "--stage", "2", "--json")

    def single_cmd(self) -> list:
        return _slaconv("calibrate", self.one13, "--stage", "2", "--batch-size", "2")

    def ref_cmd(self) -> list:
        return _slaconv("calibrate", self.ref14, "--stage", "2", "--recipe", self.r14_ref)


def prepare_models(plan: Plan, runner: Runner) -> dict:
    """Build and convert both models, the 1.3B on GPU 0 while the 14B slice uses GPU 1; copy the
    converted dirs for the one-process runs.  Returns the converted layouts of the models that made it."""
    a = plan.args
    lanes = {"14": runner.start("build14", _build_cmd("14b", plan.layers14, plan.base14, a.cpu), plan.gpu(1))}
    if not a.fsdp_only:
        lanes["13"] = runner.start("build13", _build_cmd("1.3b", plan.layers13, plan.base13, a.cpu), plan.gpu(0))
    caps = {"13": 150, "14": 150 * plan.scale14}
    built = {tag: runner.finish(job, cap_s=caps[tag], by=0.4) for tag, job in lanes.items()}
    convs = {}
    for tag, base, conv, recipe, gpu in (("13", plan.base13, plan.conv13, plan.r13, 0),
                                         ("14", plan.base14, plan.conv14, plan.r14, 1)):
        if tag in built and built[tag]["ok"]:
            convs[tag] = runner.start(f"convert{tag}", _slaconv("convert", base, "-o", conv, "--recipe", recipe),
                                      plan.gpu(gpu))
    layouts = {"build": {tag: r["json"] for tag, r in built.items()}}
    for tag, job in convs.items():
        if runner.finish(job, cap_s=caps[tag], by=0.45)["ok"]:
            conv, copy = (plan.conv13, plan.one13) if tag == "13" else (plan.conv14, plan.ref14)
            layouts[tag] = tensor_layout(conv)  # before any run replaces the weights
            if tag == "13" or plan.format_ref:
                shutil.copytree(conv, copy)
    return layouts


def run(args) -> dict:
    """Every job of the benchmark, within the budget; returns the results (and the jobs' logs)."""
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    runner = Runner(args.work, args.budget_s)
    plan = Plan(args)
    layouts = prepare_models(plan, runner)
    ok13, ok14 = "13" in layouts, "14" in layouts
    ddp = fsdp = single = ref = None
    if ok13:  # data parallel, 2 processes x batch 1
        ddp = runner.finish(runner.start("ddp13_2proc", plan.ddp_cmd(), plan.env), cap_s=170,
                            by=0.525 if ok14 else 0.7)
    if ok14:  # FSDP, the 14B slice
        # alone (--fsdp-only) it may use whatever the budget has left
        fsdp = runner.finish(runner.start(f"fsdp14_{args.fsdp_processes}proc", plan.fsdp_cmd(), plan.env),
                             cap_s=runner.left() if args.fsdp_only else 170 * plan.scale14, by=0.7 if ok13 else 1.0)
    # one process x batch 2 on GPU 0 and the one-process 14B format reference on GPU 1, together
    # (one after the other on CPU processes, which share the cores)
    single_job = runner.start("single13_1proc", plan.single_cmd(), plan.gpu(0)) if ok13 else None
    ref_job = (runner.start("single14_format_ref", plan.ref_cmd(), plan.gpu(1))
               if ok14 and not args.cpu and plan.format_ref else None)
    if single_job is not None:
        single = runner.finish(single_job, cap_s=runner.left())
    if ok14 and args.cpu:
        ref_job = runner.start("single14_format_ref", plan.ref_cmd(), plan.env)
    if ref_job is not None:
        ref = runner.finish(ref_job, cap_s=runner.left())
    result: dict = {"mode": "cpu" if args.cpu else "gpu", "budget_s": args.budget_s, "build": layouts["build"]}
    if ok13:
        result["dp_1p3b"] = dp_result(args, single, ddp, plan.one13, plan.two13, layouts["13"])
    if ok14:
        result["fsdp_14b"] = fsdp_result(args, fsdp, ref, plan.fsdp14, plan.ref14, layouts["14"], plan.layers14)
    result["jobs"] = [{k: v for k, v in r.items() if k != "json"} for r in runner.records]
    result["wall_s"] = round(time.time() - runner.t0, 1)
    result["log"] = runner.combined_log()
    return result


def dp_result(args, single, ddp, one13: Path, two13: Path, layout13: dict) -> dict:
    """Item 1: the two loss curves, their difference, memory and speed."""
    out: dict = {"model": "tiny Wan, 2 layers (CPU check)" if args.cpu else "Wan2.1-1.3B 480p",
                 "tokens": _tokens("1.3b", args.cpu), "steps": args.steps, "global_batch": 2}
    curves = {}
    for name, rec, folder in (("1proc_batch2", single, one13), ("2proc_batch1", ddp, two13)):
        if rec is None:
            continue
        s2 = stage2(rec)
        curves[name] = curve(rec, folder)
        out["lr"] = s2.get("lr", out.get("lr"))
        out[name] = {"ok": rec["ok"], "wall_s": rec["wall_s"], "distributed": s2.get("distributed"),
                     "processes": s2.get("processes"), "losses": [p["loss"] for p in curves[name]],
                     **step_seconds(curves[name]), "peak_gb_per_gpu": s2.get("peak_gpu_memory_gb_per_rank"),
                     "peak_gb_per_gpu_training": s2.get("peak_gpu_memory_gb_per_rank_training"),
                     "heldout_before": s2.get("heldout_loss_before"), "heldout_after": s2.get("heldout_loss_after")}
        if rec["ok"]:
            out[name]["layout_vs_convert"] = layout_difference(tensor_layout(folder), layout13) or "same"
    if len(curves) == 2:
        out["comparison"] = compare_curves(curves["1proc_batch2"], curves["2proc_batch1"], args.tolerance)
        a, b = out["1proc_batch2"], out["2proc_batch1"]
        if a.get("heldout_after") and b.get("heldout_after"):
            out["comparison"]["heldout_after_rel_diff"] = (abs(a["heldout_after"] - b["heldout_after"])
                                                           / a["heldout_after"])
        if a.get("s_per_step") and b.get("s_per_step"):
            out["comparison"]["dp_speedup"] = round(a["s_per_step"] / b["s_per_step"], 2)
    return out


def fsdp_result(args, fsdp, ref, fsdp14: Path, ref14: Path, layout14: dict, layers: int) -> dict:
    """Item 2: memory of every rank, speed, and the saved format against one-process saves."""
    out: dict = {"model": "tiny Wan (CPU check)" if args.cpu else "Wan2.1-14B architecture, 720p",
                 "layers": layers, "of_layers": CONFIGS["14b"]["num_layers"], "tokens": _tokens("14b", args.cpu),
                 "steps": args.fsdp_steps}
    if fsdp is not None:
        s2 = stage2(fsdp)
        points = curve(fsdp, fsdp14)
        out.update({"ok": fsdp["ok"], "wall_s": fsdp["wall_s"], "distributed": s2.get("distributed"),
                    "processes": s2.get("processes"), "losses": [p["loss"] for p in points], **step_seconds(points),
                    "peak_gb_per_gpu": s2.get("peak_gpu_memory_gb_per_rank"),
                    "peak_gb_per_gpu_training": s2.get("peak_gpu_memory_gb_per_rank_training"),
                    "heldout_before": s2.get("heldout_loss_before"), "heldout_after": s2.get("heldout_loss_after")})
        if fsdp["ok"]:
            saved = tensor_layout(fsdp14)
            out["layout_vs_convert"] = layout_difference(saved, layout14) or "same"
            out["tensors_saved"] = sum(len(v) for v in saved.values())
            if ref is not None and ref["ok"]:
                out["layout_vs_1proc_save"] = layout_difference(saved, tensor_layout(ref14)) or "same"
    if ref is not None:
        out["1proc_format_ref"] = {"ok": ref["ok"], "wall_s": ref["wall_s"],
                                   "peak_gb": stage2(ref).get("peak_gpu_memory_gb")}
    elif layers > 12 and not args.cpu:
        out["1proc_format_ref"] = f"skipped: {layers} blocks do not fit one GPU for training (12 took 91 GB)"
    return out


def _tokens(model: str, cpu: bool) -> int:
    if cpu:
        return TINY_DATA["frames"] * TINY_DATA["height"] * TINY_DATA["width"] // 4
    _, _, f, h, w = LATENTS[model]
    return f * h * w // 4


# ------------------------------------------------------------------------------------------------ report


def _fmt(x, spec=".4g"):
    return "n/a" if x is None else format(x, spec)


def render(result: dict) -> str:
    """The summary table (markdown, also printed)."""
    env = result.get("env", {})
    lines = [f"# Multi-GPU calibration ({result['mode']}): {env.get('devices')}, torch {env.get('torch')}, "
             f"accelerate {env.get('accelerate')}, diffusers {env.get('diffusers')}, {env.get('date')}, "
             f"{result['wall_s']} s wall", ""]
    dp = result.get("dp_1p3b")
    if dp:
        lines += [f"## 1. Data parallel, {dp['model']} ({dp['tokens']:,} tokens), stage 2, global batch 2, "
                  f"{dp['steps']} steps, lr {dp.get('lr')} constant", "",
                  "| run | processes | s/step (median, steps 2+) | step 1 s | peak GB per GPU (training) | "
                  "held-out before -> after | saved format vs convert |", "|---|---|---:|---:|---|---|---|"]
        for name in ("1proc_batch2", "2proc_batch1"):
            r = dp.get(name)
            if r:
                lines.append(f"| {name}{'' if r['ok'] else ' (FAILED/cut)'} | "
                             f"{r.get('processes')} {r.get('distributed')} "
                             f"| {_fmt(r.get('s_per_step'), '.2f')} | {_fmt(r.get('first_step_s'), '.1f')} | "
                             f"{r.get('peak_gb_per_gpu_training')} | {_fmt(r.get('heldout_before'))} -> "
                             f"{_fmt(r.get('heldout_after'))} | {r.get('layout_vs_convert', 'n/a')} |")
        c = dp.get("comparison")
        if c:
            lines += ["", "| step | 1 proc x 2 | 2 procs x 1 | rel. diff |", "|---:|---:|---:|---:|"]
            a, b = dp["1proc_batch2"]["losses"], dp["2proc_batch1"]["losses"]
            lines += [f"| {i + 1} | {a[i]:.6g} | {b[i]:.6g} | {c['rel_diff'][i]:.2e} |"
                      for i in range(c["steps_compared"])]
            lines += ["", f"max rel. diff {_fmt(c['max_rel_diff'], '.2e')} over {c['steps_compared']} steps "
                      f"(step 1: {_fmt(c['step1_rel_diff'], '.2e')}; tolerance {c['tolerance']:.0e}) -> "
                      f"{'MATCH' if c['match'] else 'NO MATCH'}; the curve itself spans "
                      f"{_fmt(c['curve_spread_rel'], '.1%')} between steps; held-out after differs "
                      f"{_fmt(c.get('heldout_after_rel_diff'), '.2e')}; DP speed-up {c.get('dp_speedup')}x (ideal 2)"]
    fs = result.get("fsdp_14b")
    if fs:
        lines += ["", f"## 2. FSDP, {fs['model']}, {fs['layers']} of {fs['of_layers']} layers "
                  f"({fs['tokens']:,} tokens), {fs.get('processes') or '?'} processes x batch 1, "
                  f"{fs['steps']} steps", "",
                  "| ok | s/step (median, steps 2+) | step 1 s | peak GB per GPU (training) | "
                  "peak GB per GPU (incl. save) "
                  "| losses | format vs convert | format vs 1-process save |", "|---|---:|---:|---|---|---|---|---|",
                  f"| {fs.get('ok')} ({fs.get('distributed')}) | {_fmt(fs.get('s_per_step'), '.2f')} | "
                  f"{_fmt(fs.get('first_step_s'), '.1f')} | {fs.get('peak_gb_per_gpu_training')} | "
                  f"{fs.get('peak_gb_per_gpu')} | {', '.join(f'{x:.4g}' for x in fs.get('losses', []))} | "
                  f"{fs.get('layout_vs_convert', 'n/a')} | {fs.get('layout_vs_1proc_save', 'n/a')} |"]
    lines += ["", "| job | ok | wall s |", "|---|---|---:|"]
    lines += [f"| {j['name']} | {j['ok']}{' (timed out)' if j['timed_out'] else ''} | {j['wall_s']} |"
              for j in result.get("jobs", [])]
    return "\n".join(lines) + "\n"


def environment(result: dict, cpu: bool) -> dict:
    """Versions and devices (device names from the build jobs: this process never touches a GPU)."""
    import accelerate
    import torch

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    names = sorted({b["device"] for b in (result.get("build") or {}).values() if b})
    return {"torch": torch.__version__, "accelerate": accelerate.__version__, "diffusers": diffusers_version,
            "devices": "cpu" if cpu else f"{torch.cuda.device_count()} x {', '.join(names) or '?'}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slaconv-multigpu"))
    ap.add_argument("--steps", type=int, default=6, help="stage-2 steps of the data-parallel runs")
    ap.add_argument("--fsdp-layers", type=int, default=6, help="blocks of the 14B architecture to build (of 40)")
    ap.add_argument("--fsdp-steps", type=int, default=3)
    ap.add_argument("--fsdp-processes", type=int, default=2, help="processes (GPUs) of the FSDP run")
    ap.add_argument("--fsdp-only", action="store_true", help="skip the data-parallel comparison (item 1)")
    ap.add_argument("--tolerance", type=float, default=2e-2, help="max relative per-step loss difference of a match")
    ap.add_argument("--budget-s", type=float, default=400, help="wall-clock budget of the whole run")
    ap.add_argument("--cpu", action="store_true", help="tiny models on CPU processes (checks the logic, not speed)")
    ap.add_argument("--build", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:  # internal: one base model, in its own process (and on its own GPU)
        print(json.dumps(build_base(args.build, args.layers, args.dst, args.cpu), indent=2))
        return
    if args.out is None:
        ap.error("--out is required")
    if not args.cpu:
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()} (use --cpu for the CPU check)")
    if not 1 <= args.fsdp_layers <= CONFIGS["14b"]["num_layers"] or args.steps < 2 or args.fsdp_steps < 1:
        raise SystemExit("--fsdp-layers must be 1..40, --steps >= 2, --fsdp-steps >= 1")
    result = run(args)
    result["env"] = environment(result, args.cpu)
    log = result.pop("log")
    table = render(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_multigpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_multigpu.md").write_text(table)
    (args.out / "bench_multigpu_logs.txt").write_text(log[-15_000_000:])
    print(table, flush=True)


if __name__ == "__main__":
    main()
