"""Quality candidates compared on the same footing: named recipe overrides, the same budget, paired statistics.

Every candidate is a set of dotted recipe keys over the quality table's recipe
(:func:`slaconv.quality.table.write_recipe`), plus at most two edits the CLI has no flag for (alpha pinned to
1; stage 1 skipped).  Each is converted from the shipped original by the real CLI and trained with the same
stage-1 and stage-2 budget (steps, batch, lr, data, seed) at every sparsity and seed:

    paper                  SLA2 as published: softmax feature map, alpha per head
    hedgehog               sla2.feature_map: hedgehog (stage 1 learns the feature weights)
    query-alpha            sla2.mixing: query
    hedgehog+query-alpha   both
    linear-all             sla2.linear_keys: all (the linear branch over every key block, no per-block state)
    hedgehog+query-alpha+linear-all   all three
    hedgehog+query-linear+linear-all  alpha per query from the query alone (sla2.mixing: query-linear)
    hedgehog+query-block+linear-all   alpha per query from the query and its block's pooled tail mass
    uneven-budget          sla2.budget: per_layer (the same key blocks in all, each where it holds most mass)
    uneven-budget-tail     sla2.budget: per_layer_tail (blocks in proportion to the mass left out: diffuse first)
    sparse-only            alpha pinned to 1 before and after stage 1
    heuristic-router       no stage 1: SLA's pooled router as convert leaves it
    dense control          (once per seed) top-k 1, alpha 1, bf16: the original fine-tuned by the same stage 2

A candidate whose keys the installed recipe schema rejects is skipped and reported as such, with the
reason, at the top of results.md and in results.json.  ``--define NAME:key=value,key=value`` adds a
candidate without code changes.  Rows run as ``--jobs`` parallel processes
(:mod:`slaconv.quality.candidate_row`) sharing the device; ``--max-minutes`` stops starting rows when
the time is up and ends the running ones, and every finished row is kept.

Every row is scored on the same held-out (video, noise, sigma) triples: its loss over the original's with a
paired bootstrap 95% interval, and its difference to the same seed's dense control with one; sample PSNR /
SSIM against the original's samples from identical seeds and the classifier's accuracy at the
``--sample-topk`` sparsities (97% by default).

    python -m slaconv.quality.candidates --model M --classifier C --out OUT --jobs 12 --max-minutes 8.5
    python -m slaconv.quality.candidates --model M --out OUT --smoke         # tiny CPU run for tests

Writes OUT/results.md, results.json, loss_vs_sparsity.png, rows/<id>/ (row.json, work dir, samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from slaconv.errors import RecipeError, UsageError
from slaconv.quality import candidate_report, common
from slaconv.quality import synthvideo as sv
from slaconv.quality.candidate_row import score, use_tf32
from slaconv.quality.command_line import add_model_arguments, fraction, one_line_errors, positive_float, positive_int
from slaconv.quality.table import check_inputs, write_recipe
from slaconv.quality.table_settings import table_settings
from slaconv.recipe import load_recipe
from slaconv.utils.files import read_json


@dataclass(frozen=True)
class Candidate:
    """A named way to convert: recipe keys over the table's recipe, and the edits the CLI has no flag for."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Dotted recipe keys, e.g. ``{"sla2.feature_map": "hedgehog"}``."""
    stage1: bool = True
    pin_alpha: bool = False
    """alpha = 1 (sparse branch only), pinned before and after stage 1."""
    slots: int = 1
    """Job slots a row takes: rows whose attention runs the PyTorch reference on the GPU take more memory."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "overrides": dict(self.overrides)}


CANDIDATES = {c.name: c for c in (
    Candidate("paper"),
    Candidate("hedgehog", {"sla2.feature_map": "hedgehog"}),
    Candidate("query-alpha", {"sla2.mixing": "query"}),
    Candidate("hedgehog+query-alpha", {"sla2.feature_map": "hedgehog", "sla2.mixing": "query"}),
    Candidate("linear-all", {"sla2.linear_keys": "all"}),
    Candidate("hedgehog+query-alpha+linear-all", {"sla2.feature_map": "hedgehog", "sla2.mixing": "query",
                                                  "sla2.linear_keys": "all"}),
    Candidate("hedgehog+query-linear+linear-all", {"sla2.feature_map": "hedgehog", "sla2.mixing": "query-linear",
                                                   "sla2.linear_keys": "all"}),
    Candidate("hedgehog+query-block+linear-all", {"sla2.feature_map": "hedgehog", "sla2.mixing": "query-block",
                                                  "sla2.linear_keys": "all"}),
    Candidate("uneven-budget", {"sla2.budget": "per_layer"}),
    Candidate("uneven-budget-tail", {"sla2.budget": "per_layer_tail"}),
    Candidate("sparse-only", pin_alpha=True),
    Candidate("heuristic-router", stage1=False),
)}
DENSE_CONTROL = Candidate("dense control", {"sla2.topk": 1.0, "sla2.quant": "none"}, stage1=False, pin_alpha=True)

SETTINGS = {
    "topks": [0.03, 0.05, 0.10, 0.15],  # 97 / 95 / 90 / 85 %, the sparsest first: a time box keeps those
    "seeds": [0, 1],
    "sample_topks": [0.03],
    "jobs": 12,
}
SMOKE = {"topks": [0.10], "seeds": [0, 1], "sample_topks": [0.10], "jobs": 2}


def parse_assignments(body: str, flag: str, text: str) -> dict[str, Any]:
    """``key=value,key=value`` (values parsed as YAML, and numbers such as ``1e-5`` as numbers) -> a dict of
    dotted recipe keys; ``flag`` and ``text`` name the argument in the error."""
    overrides = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"{flag} {text!r}: {item!r} is not key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key.strip()] = parsed
    return overrides


def parse_definition(text: str) -> Candidate:
    """``NAME:key=value,key=value`` -> a :class:`Candidate` with those overrides (:func:`parse_assignments`)."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"--define {text!r}: expected NAME:key=value[,key=value]")
    return Candidate(name.strip(), parse_assignments(body, "--define", text))


def candidate_recipe(path: Path, settings: dict, spec, candidate: Candidate, topk: float, seed: int,
                     objective: str) -> str | None:
    """Write the candidate's recipe: the table's, then the run's ``recipe_set`` keys (every row's, the dense
    control's too), then the candidate's; returns why the installed recipe schema rejects it, or None."""
    base = {**settings, "quant": "none"} if candidate is DENSE_CONTROL else settings
    write_recipe(path, base, spec, topk=topk, objective=objective, seed=seed)
    tree = yaml.safe_load(path.read_text())
    for key, value in {**settings.get("recipe_set", {}), **candidate.overrides}.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        load_recipe(path)
    except RecipeError as exc:
        return str(exc)
    return None


def row_environment(slots: int) -> dict[str, str]:
    """The environment of a row process: its share of the CPU threads, so that ``slots`` processes' intra-op
    thread pools do not oversubscribe the cores (each would otherwise start one thread per core)."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, slots)))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}


def end_state(returncode: int, row_log: Path) -> str:
    """``done``, or ``failed: ...`` with the row log's last line; a row killed by a signal says which (SIGKILL
    is what the kernel's out-of-memory killer sends)."""
    if returncode == 0:
        return "done"
    if returncode < 0:
        hint = " (out of memory?)" if returncode == -9 else ""
        return f"failed: killed by signal {-returncode}{hint}"
    tail = row_log.read_text().strip().splitlines() if row_log.exists() else []
    return f"failed: exit {returncode}: {(tail or ['?'])[-1].strip()}"


def run_jobs(jobs: list[dict], slots: int, deadline: float | None, log) -> dict[str, str]:
    """Run every job as a process, at most ``slots`` job slots at once, in order; returns each job's end state
    (``done``, ``failed: ...``, ``cut by the time box`` or ``not started``).  Past ``deadline`` (monotonic
    seconds) the running jobs are ended; a job is not started when the median finished job would not end by it."""
    pending, running, state, durations = list(jobs), {}, {}, []
    while pending or running:
        now = time.monotonic()
        # a row that would not end in time is not started: the median finished row's time must still fit
        expected = sorted(durations)[len(durations) // 2] if durations else 0.0
        if deadline is not None and pending and not running and now + expected > deadline:
            now = deadline + 1
        if deadline is not None and now > deadline:
            for job, (proc, _, _) in running.items():
                proc.terminate()
                proc.wait()
                state[job] = "cut by the time box"
            for job in pending:
                state[job["id"]] = "not started"
            break
        used = sum(job["slots"] for _, job, _ in running.values())
        while pending and (not running or used + pending[0]["slots"] <= slots) and (
                deadline is None or now + expected <= deadline):
            job = pending.pop(0)
            folder = Path(job["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            common.write_json(folder / "job.json", job)
            with open(folder / "row.log", "w") as logfile:
                proc = subprocess.Popen([sys.executable, "-m", "slaconv.quality.candidate_row",
                                         str(folder / "job.json")], stdout=logfile, stderr=subprocess.STDOUT,
                                        env=row_environment(slots))
            running[job["id"]] = (proc, job, now)
            used += job["slots"]
            log(f"[start] {job['id']} ({len(running)} running)")
        for job_id, (proc, job, started) in list(running.items()):
            if proc.poll() is not None:
                del running[job_id]
                durations.append(time.monotonic() - started)
                state[job_id] = end_state(proc.returncode, Path(job["folder"]) / "row.log")
                log(f"[{'end' if proc.returncode == 0 else 'FAILED'}] {job_id} after {durations[-1]:.0f} s: "
                    f"{state[job_id]}")
        time.sleep(0.2)
    return state


def run(model_dir: Path, out: Path, *, classifier_dir: Path | None = None, smoke: bool = False,
        settings_override: dict | None = None, names: list[str] | None = None, defined: list[Candidate] = (),
        objective: str = "diffusion", device: str = "auto", max_minutes: float | None = None, log=print) -> dict:
    """Build the comparison in ``out`` and return results.json's content (see the module docstring)."""
    timer = common.Timer()
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    settings = table_settings(smoke, {**(SMOKE if smoke else SETTINGS), **(settings_override or {})})
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    spec = check_inputs(model_dir, classifier_dir, settings, "guidance" in (settings_override or {}), log)
    if settings.get("frames"):
        spec = dataclasses.replace(spec, frames=settings["frames"])
    catalogue = {**CANDIDATES, **{c.name: c for c in defined}}
    chosen = names or list(catalogue)
    unknown = [n for n in chosen if n not in catalogue]
    if unknown:
        raise UsageError(f"unknown candidate {unknown[0]!r} (known: {', '.join(catalogue)}; or --define it)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("rows", "recipes", "data"):
        shutil.rmtree(out / stale, ignore_errors=True)
    data_dir = out / "data"
    sv.write_slaconv_dataset(data_dir, common.CALIB_SEED, settings["calib_samples"], spec,
                             dtype=torch.float32 if smoke else torch.float16, null_every=settings["calib_null_every"])

    dev = common.pick_device(device)
    tf32 = use_tf32(str(dev))
    row_eval = {"model": str(model_dir), "frames": settings.get("frames"), "heldout_samples": settings["heldout_samples"],
                "sample_per_class": settings["sample_per_class"], "sample_steps": settings["sample_steps"],
                "guidance": settings["guidance"]}
    original = score(common.load_model(model_dir, dev), {**row_eval, "samples": True}, dev)
    torch.save(original.pop("samples"), out / "original_samples.pt")

    skipped, jobs = {}, []
    # in the order a time box should keep them: the controls, then sparsity by sparsity (sparsest first), seeds
    plan = [(DENSE_CONTROL, 1.0, seed) for seed in settings["seeds"]]
    plan += [(catalogue[n], t, seed) for t in settings["topks"] for seed in settings["seeds"] for n in chosen]
    for cand, topk, seed in plan:
        if cand.name in skipped:
            continue
        tag = "dense" if cand is DENSE_CONTROL else f"{round((1 - topk) * 100)}"
        job_id = f"{cand.name}/{tag}/s{seed}"
        recipe = out / "recipes" / f"{job_id.replace('/', '_')}.yaml"
        reason = candidate_recipe(recipe, settings, spec, cand, topk, seed, objective)
        if reason:
            skipped[cand.name] = reason
            log(f"[SKIPPED] candidate {cand.name}: {reason}")
            continue
        jobs.append({**row_eval, "id": job_id, "candidate": cand.name, "topk": topk, "seed": seed,
                     "recipe": str(recipe), "data": str(data_dir), "device": str(dev),
                     "folder": str(out / "rows" / job_id.replace("/", "_")), "stage1": cand.stage1,
                     "pin_alpha": cand.pin_alpha, "slots": min(cand.slots, settings["jobs"]),
                     "samples": cand is not DENSE_CONTROL and topk in settings["sample_topks"]})
    log(f"[plan] {len(jobs)} rows, {settings['jobs']} job slots, skipped: {', '.join(skipped) or 'none'}")
    state = run_jobs(jobs, settings["jobs"], deadline, log)
    rows = [read_json(Path(j["folder"]) / "row.json") for j in jobs if state.get(j["id"]) == "done"]
    result = {
        "settings": {**settings, "objective": objective, "smoke": smoke, "device": str(dev), "tf32": tf32},
        "candidates": {n: catalogue[n].to_dict() for n in chosen}, "dense_control": DENSE_CONTROL.to_dict(),
        "skipped": skipped, "row_state": state, "model": str(model_dir), "spec": spec.to_dict(),
        "original": original, "seconds_total": None, "env": common.env_summary(),
    }
    result.update(candidate_report.summarize(rows, original, out, classifier_dir, spec, dev))
    result["seconds_total"] = round(timer(), 1)
    candidate_report.write(out, result)
    log(f"wrote {out / 'results.md'}, results.json, loss_vs_sparsity.png in {timer():.0f} s")
    return result


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--candidates", help=f"comma-separated names (default: all of {', '.join(CANDIDATES)})")
    ap.add_argument("--define", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a further candidate from dotted recipe keys, e.g. 'lr3:calibration.stage1.lr=3e-4'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE,...", dest="recipe_set",
                    help="dotted recipe keys for every row, the dense control included (the candidates' own keys "
                         "come after), e.g. 'calibration.stage2.lr_schedule=cosine'")
    ap.add_argument("--topk", type=fraction, action="append", help="sparsities as top-k fractions (repeat)")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--sample-topk", type=fraction, action="append",
                    help="sparsities whose rows draw samples for PSNR / SSIM / accuracy (default: 0.03)")
    ap.add_argument("--jobs", type=positive_int, help="job slots: rows run at once (default 12)")
    ap.add_argument("--stage1-steps", type=positive_int)
    ap.add_argument("--stage2-steps", type=positive_int)
    ap.add_argument("--heldout-samples", type=positive_int)
    ap.add_argument("--frames", type=positive_int,
                    help="frames per video instead of the trained spec's (fewer: shorter sequences, faster rows)")
    ap.add_argument("--objective", choices=["diffusion", "distill"], default="diffusion",
                    help="stage 2's objective for every row (default diffusion: with distill the dense control "
                         "is the original itself)")
    ap.add_argument("--max-minutes", type=positive_float, help="stop starting rows and end running ones then")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    over: dict = {"stage1": {}, "stage2": {}}
    for flag, key in (("topk", "topks"), ("seeds", "seeds"), ("sample_topk", "sample_topks"), ("jobs", "jobs"),
                      ("heldout_samples", "heldout_samples"), ("frames", "frames")):
        if getattr(args, flag) is not None:
            over[key] = getattr(args, flag)
    for stage in ("stage1", "stage2"):
        if getattr(args, f"{stage}_steps") is not None:
            over[stage]["steps"] = getattr(args, f"{stage}_steps")
    for text in args.recipe_set:
        over.setdefault("recipe_set", {}).update(parse_assignments(text, "--set", text))
    res = run(args.model, args.out, classifier_dir=args.classifier, smoke=args.smoke, settings_override=over,
              names=args.candidates.split(",") if args.candidates else None,
              defined=[parse_definition(d) for d in args.define], objective=args.objective, device=args.device,
              max_minutes=args.max_minutes)
    print(candidate_report.markdown(res))


if __name__ == "__main__":
    main()
