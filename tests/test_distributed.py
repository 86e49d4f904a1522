"""Several processes train like one process with the same global batch, and save the same format.

Data parallel: two CPU processes (torchrun, gloo).  FSDP: two CPU processes started by
``accelerate launch`` with the shipped GPU config (benchmarks/accelerate_fsdp.yaml); accelerate
enables FSDP only for GPU process groups, so tests/fsdp_cpu_launch.py flips that one switch and the
model is wrapped, sharded and gathered by the real accelerate + torch FSDP code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_wan, run, write_recipe

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "benchmarks" / "accelerate_fsdp.yaml"


def _losses(work, stage):
    key = "loss_rel_mse_mean" if stage == 1 else "loss"
    return [json.loads(x)[key] for x in (work / "logs" / f"stage{stage}.jsonl").read_text().splitlines()]


# lr 1e-3 moves the tiny model far from its dense teacher (the held-out loss rises ~60x in two steps): wanted
# here, where only the agreement between process counts matters, so the guards against a worse model are off
TRAIN_ANYWAY = {"calibration.divergence_factor": 1e30, "calibration.heldout_tolerance": 1e30}


def _layer_losses(work):
    """Stage 1's per-layer relative errors, step by step."""
    records = [json.loads(x) for x in (work / "logs" / "stage1.jsonl").read_text().splitlines()]
    return [[r["layers"][name] for name in sorted(r["layers"])] for r in records]


def _close(a, b, tol):
    return len(a) == len(b) and all(abs(x - y) <= tol * abs(x) for x, y in zip(a, b))


def _subprocess(cmd, extra_env=None, timeout=300) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)  # only rank 0 prints


def _fsdp_calibrate(work, *args, extra_env=None) -> dict:
    """``slaconv calibrate WORK ARGS --json`` on two CPU processes under FSDP (the shipped accelerate config)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           str(ROOT / "tests" / "fsdp_cpu_launch.py"), "-q", "calibrate", str(work), *map(str, args), "--json"]
    return _subprocess(cmd, extra_env)


def _layout(work) -> dict:
    """{file: {tensor: (shape, dtype)}} for every safetensors file of a work dir."""
    return {p.name: {k: (tuple(v.shape), v.dtype) for k, v in load_file(str(p)).items()}
            for p in sorted(Path(work).glob("*.safetensors"))}


def _relative_distance(a_dir, b_dir, base_dir) -> float:
    """||a - b|| / ||a - base|| over the diffusers weights: 0 when two runs trained alike."""
    name = "diffusion_pytorch_model.safetensors"
    a, b, base = (load_file(str(Path(d) / name)) for d in (a_dir, b_dir, base_dir))
    apart = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    moved = sum(float((a[k].float() - base[k].float()).norm() ** 2) for k in a) ** 0.5
    assert moved > 0, "training did not change the weights"
    return apart / moved


def test_two_processes_match_one_process_with_same_global_batch(tmp_path, tiny_wan_dir):
    recipe = write_recipe(tmp_path / "r.yaml", **{"calibration.stage1.steps": 3, "calibration.stage2.steps": 3})
    one, two = tmp_path / "one", tmp_path / "two"
    run("convert", tiny_wan_dir, "-o", one, "--recipe", recipe)
    shutil.copytree(one, two)
    run("calibrate", one, "--batch-size", 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _subprocess([*torchrun, "-m", "slaconv", "-q", "calibrate", str(two), "--batch-size", "1", "--json"])
    assert out["stage2"]["processes"] == 2 and out["stage2"]["distributed"] == "MULTI_CPU"
    assert [r["loss"] for r in out["loss_curve"]["stage2"]] == _losses(two, 2)
    for stage in (1, 2):
        a, b = _losses(one, stage), _losses(two, stage)
        assert len(a) == len(b) == 3
        assert _close(a, b, 1e-4), (stage, a, b)
    layers_one, layers_two = (_layer_losses(w) for w in (one, two))
    assert all(_close(x, y, 1e-4) for x, y in zip(layers_one, layers_two)), (layers_one, layers_two)
    sa, sb = load_file(str(one / "sla2.safetensors")), load_file(str(two / "sla2.safetensors"))
    assert all((sa[k] - sb[k]).abs().max() < 1e-4 for k in sa)


def test_fsdp_two_processes_match_one_process_and_save_the_same_format(tmp_path, tiny_wan_dir):
    """FSDP (FULL_SHARD, one unit per WanTransformerBlock) with gradient checkpointing, a bf16 recipe
    and int8-fp8 QAT: same losses as one process with batch 2, the same saved tensors (names, shapes,
    dtypes; values to fp32 rounding), and a mid-run checkpoint that one process resumes exactly."""
    recipe = write_recipe(tmp_path / "r.yaml", **{
        "model.dtype": "bfloat16", "calibration.stage2.steps": 3, "calibration.stage2.lr": 1e-3,
        "calibration.stage2.warmup_steps": 0, "calibration.stage2.gradient_checkpointing": True,
        # clipping acts at every step, so a norm over one shard instead of the whole model would show
        "calibration.stage2.grad_clip": 1e-3, "calibration.checkpoint_every": 2, **TRAIN_ANYWAY})
    one, two = tmp_path / "one", tmp_path / "two"
    run("convert", tiny_wan_dir, "-o", one, "--recipe", recipe)
    shutil.copytree(one, two)
    converted = tmp_path / "converted"
    shutil.copytree(one, converted)
    single = json.loads(run("calibrate", one, "--stage", "2", "--batch-size", 2, "--json").stdout)["stage2"]
    out = _fsdp_calibrate(two, "--stage", "2", "--batch-size", 1)
    fsdp = out["stage2"]
    assert fsdp["distributed"] == "FSDP" and fsdp["processes"] == 2 and single["distributed"] == "NO"
    # the bf16 teacher's targets round differently at batch 2 than at batch 1 (~1e-4 relative)
    assert _close(_losses(one, 2), _losses(two, 2), 1e-3), (_losses(one, 2), _losses(two, 2))
    assert abs(fsdp["heldout_loss_after"] - single["heldout_loss_after"]) <= 1e-2 * single["heldout_loss_after"]
    assert fsdp["kept_step"] == single["kept_step"] and fsdp["run_id"] == single["run_id"]
    assert _layout(two) == _layout(one) == _layout(converted)  # the format never depends on the process count
    assert {str(dt) for f in _layout(two).values() for _, dt in f.values()} == {"torch.bfloat16", "torch.float32"}
    assert _relative_distance(one, two, converted) < 0.05  # bf16 saves: a few elements round the other way
    sa, sb = load_file(str(one / "sla2.safetensors")), load_file(str(two / "sla2.safetensors"))
    assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-5) for k in sa)
    # the FSDP run's checkpoint holds the whole state: one process resumes it with the same global batch
    resumed = tmp_path / "resumed"
    shutil.copytree(converted, resumed)
    run("calibrate", resumed, "--stage", "2", "--batch-size", 2, "--resume",
        two / "checkpoints" / "stage2" / "checkpoint-2")
    assert _close(_losses(resumed, 2)[-1:], _losses(two, 2)[-1:], 1e-3)
    assert _relative_distance(resumed, two, converted) < 0.05


def test_fsdp_runs_the_triton_op_under_gradient_checkpointing(tmp_path):
    """The fused SLA2 op (Triton interpreter on CPU, head dim 64) forward and backward inside FSDP units
    with gradient checkpointing: same losses as one process.  The teacher's targets are precomputed (every
    rank loads, runs and frees its own teacher before training: the 14B recipes' setting)."""
    base = tmp_path / "base"
    make_wan(attention_head_dim=64).save_pretrained(base)
    recipe = write_recipe(tmp_path / "r.yaml", **{
        "data.height": 16, "data.width": 16, "calibration.stage2.steps": 2, "calibration.stage2.lr": 1e-3,
        "calibration.stage2.warmup_steps": 0, "calibration.stage2.gradient_checkpointing": True,
        # the low-bit modes round: tiny differences between batch 2 and 2 x batch 1 can flip a rounding
        "calibration.stage2.quant": "none", "calibration.eval_samples": 1, "calibration.stage2.teacher": "precompute",
        **TRAIN_ANYWAY})
    one, two = tmp_path / "one", tmp_path / "two"
    run("convert", base, "-o", one, "--recipe", recipe)
    shutil.copytree(one, two)
    env = {"SLACONV_BACKEND": "triton", "TRITON_INTERPRET": "1"}  # 'triton' fails loudly if the op cannot run
    single = _subprocess([sys.executable, "-m", "slaconv", "-q", "calibrate", str(one), "--stage", "2",
                          "--batch-size", "2", "--json"], env)
    fsdp = _fsdp_calibrate(two, "--stage", "2", "--batch-size", 1, extra_env=env)
    assert fsdp["stage2"]["distributed"] == "FSDP" and fsdp["stage2"]["teacher"] == "precompute"
    a = [r["loss"] for r in single["loss_curve"]["stage2"]]
    b = [r["loss"] for r in fsdp["loss_curve"]["stage2"]]
    assert _close(a, b, 1e-4) and a[1] != a[0], (a, b)
    assert _layout(one) == _layout(two)


def _accelerate_fsdp_env(**changes) -> dict:
    """The FSDP environment ``accelerate launch`` derives from benchmarks/accelerate_fsdp.yaml."""
    import yaml

    fsdp = {**yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"], **changes}
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"])}
    for key, value in fsdp.items():
        name = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}.get(key, key.upper())
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def test_fsdp_plugin_computes_in_fp32_and_needs_original_params(monkeypatch):
    """slaconv pins FSDP's mixed precision to fp32 (autocast gives the bf16 compute, as on one process;
    accelerate's bf16 default would cast the RoPE tables and the timestep) and refuses FSDP1 with
    flattened parameters (the router is frozen, alpha and the weights of its block train)."""
    from slaconv.calibrate.distributed import fsdp_plugin
    from slaconv.errors import UsageError

    for key, value in _accelerate_fsdp_env().items():
        monkeypatch.setenv(key, value)
    plugin = fsdp_plugin()
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (torch.float32,) * 3
    assert plugin.fsdp_version == 1 and plugin.use_orig_params and plugin.transformer_cls_names_to_wrap == [
        "WanTransformerBlock"]
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with mixed_precision="bf16"
    assert plugin.mixed_precision_policy.param_dtype == torch.float32
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    with pytest.raises(UsageError, match="fsdp_use_orig_params"):
        fsdp_plugin()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin() is None
