"""Stage-1 and stage-2 step time and peak GPU memory on the real Wan2.1-1.3B architecture at 480p.

Random bf16 weights (step time and memory do not depend on their values, and nothing is downloaded);
everything runs through the real CLI (`slaconv convert`, `slaconv calibrate --json`) with the shipped
recipe, shortened to a few steps and batch 1 without accumulation.

    python benchmarks/bench_calibrate.py --out OUT [--stage1-steps 4] [--stage2-steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_model import COMMON, CONFIGS  # noqa: E402


def sh(*args) -> dict:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "slaconv", "-q", *map(str, args), "--json"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout)
    out["_wall_s"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slaconv-bench"))
    ap.add_argument("--stage1-steps", type=int, default=4)
    ap.add_argument("--stage2-steps", type=int, default=3)
    ap.add_argument("--recipe", type=Path, default=Path("recipes/wan2.1-t2v-1.3b-480p.yaml"))
    args = ap.parse_args()
    from diffusers import WanTransformer3DModel

    base = args.work / "base"
    if not (base / "config.json").is_file():
        with torch.device("cuda"):
            net = WanTransformer3DModel(**COMMON, **CONFIGS["1.3b"])
        net.to(torch.bfloat16).save_pretrained(base)
        del net
        torch.cuda.empty_cache()
    recipe = yaml.safe_load(args.recipe.read_text())
    recipe["calibration"]["stage1"]["steps"] = args.stage1_steps
    recipe["calibration"]["stage2"].update(steps=args.stage2_steps, grad_accum=1, batch_size=1, warmup_steps=1)
    recipe["calibration"]["checkpoint_every"] = 1000
    recipe_path = args.work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    work = args.work / "work"
    conv = sh("convert", base, "-o", work, "--recipe", recipe_path, "--overwrite")
    s1 = sh("calibrate", work, "--stage", "1")
    s2 = sh("calibrate", work, "--stage", "2")
    result = {
        "card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "recipe": str(args.recipe), "convert_wall_s": conv["_wall_s"],
        "stage1": s1["stage1"], "stage2": s2["stage2"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_calibrate.json").write_text(json.dumps(result, indent=2))
    st1, st2 = s1["stage1"], s2["stage2"]
    print(f"Wan2.1-1.3B 480p (32,760 tokens), {result['card']}, batch 1")
    print(f"stage 1: {st1['seconds'] / st1['steps']:.2f} s/step over {st1['steps']} steps, "
          f"peak {st1.get('peak_gpu_memory_gb')} GB, rel. MSE {st1['rel_mse_first']:.4f} -> {st1['rel_mse_last']:.4f}")
    print(f"stage 2: {st2['seconds'] / st2['steps']:.2f} s/step over {st2['steps']} steps ({st2['objective']}, "
          f"{st2['quant']}, grad. checkpointing), peak {st2.get('peak_gpu_memory_gb')} GB, "
          f"loss {st2['loss_first']:.4g} -> {st2['loss_last']:.4g}")


if __name__ == "__main__":
    main()
