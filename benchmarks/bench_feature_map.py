"""Stage 1 with each linear-branch feature map: held-out attention error at the start and after training.

For every setting -- softmax features, and hedgehog features from each starting point (``identity``: the
first d/2 columns of the identity, what the processor uses; ``orthogonal``: seeded random orthonormal columns)
at each feature learning rate -- the model is converted afresh, stage 1 runs through the library, and its
held-out attention error (relative MSE of the hard-mask forward) before and after is recorded.

    python benchmarks/bench_feature_map.py --model MODEL_DIR --out results.json [--steps 40] [--topk 0.25]
        [--feature-lr 1e-3 1e-2 3e-2] [--init identity orthogonal] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slaconv.calibrate.stage1 import run_stage1
from slaconv.convert import convert
from slaconv.quality.tail_fit import hedgehog_init as orthogonal_init
from slaconv.recipe import load_recipe


def start_from_orthogonal(work: Path, seed: int) -> None:
    """Replace every layer's hedgehog weights in the work dir by seeded orthonormal columns."""
    path = work / "sla2.safetensors"
    state = load_file(str(path))
    for key in sorted(k for k in state if k.endswith((".feature_q", ".feature_k"))):
        heads, dim, width = state[key].shape
        state[key] = orthogonal_init(heads, dim, width, seed).contiguous()
    save_file(state, str(path), metadata={"format": "slaconv-sla2"})


def run_one(model: str, overrides: dict, init: str | None, device: str) -> dict:
    recipe = load_recipe(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "w"
        convert(model, work, recipe, device=device)
        if init == "orthogonal":
            start_from_orthogonal(work, recipe.calibration.seed)
        t0 = time.time()
        s1 = run_stage1(work, recipe, device=device, show_progress=False)["stage1"]
    return {"before": s1["heldout_attention_rel_mse_before"], "after": s1["heldout_attention_rel_mse_after"],
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--topk", type=float, default=0.25)
    ap.add_argument("--feature-lr", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2])
    ap.add_argument("--init", nargs="+", default=["identity", "orthogonal"], choices=["identity", "orthogonal"])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base = {"sla2.topk": args.topk, "sla2.block_q": 64, "sla2.block_k": 64, "sla2.quant": "none",
            "calibration.stage1.steps": args.steps, "calibration.stage1.lr": 1e-3,
            "calibration.stage1.query_blocks_per_step": 4, "calibration.eval_samples": 3,
            "calibration.checkpoint_every": 100000, "data.frames": args.frames, "data.height": args.size,
            "data.width": args.size}
    rows = [{"feature_map": "softmax", **run_one(args.model, base, None, args.device)}]
    print(rows[-1], flush=True)
    for init in args.init:
        for lr in args.feature_lr:
            overrides = {**base, "sla2.feature_map": "hedgehog", "calibration.stage1.feature_lr": lr}
            rows.append({"feature_map": "hedgehog", "init": init, "feature_lr": lr,
                         **run_one(args.model, overrides, init, args.device)})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "torch": torch.__version__, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
