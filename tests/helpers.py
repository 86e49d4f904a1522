"""Builders and checks that several test modules share: a tiny Wan transformer, fast recipe settings,
folder snapshots and CLI invocations. Fixtures live in ``conftest.py``; this module has none."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from slaconv.cli import main
from slaconv.kernels import reference as R

# diffusers' tests/models/transformers/test_models_transformer_wan.py init dict, with head dim 24 so
# that both blocks of 64 tokens and RoPE's t/h/w split work.
WAN_TEST_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
}


def tiny_wan_inputs(seed: int = 0) -> dict:
    """Forward keyword arguments for :func:`make_wan`'s model: a (1, 4, 2, 18, 22) latent, a timestep and text."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 18, 22, generator=g), timestep=torch.tensor([321.0]),
                encoder_hidden_states=torch.randn(1, 6, 16, generator=g), return_dict=False)


def assert_saved_copy_runs_alike(work: Path, saved: Path):
    """Load the converted model in ``work``, save it to ``saved``, load that, and check both give the same output
    bit for bit; returns (model, copy)."""
    import slaconv

    model = slaconv.from_pretrained(work)
    model.save_pretrained(saved)
    again = slaconv.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(model(**tiny_wan_inputs())[0], again(**tiny_wan_inputs())[0])
    return model, again


def make_wan(seed: int = 0, **overrides):
    """A tiny randomly initialised ``WanTransformer3DModel`` (``WAN_TEST_CONFIG`` plus ``overrides``), in eval mode."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_TEST_CONFIG, **overrides}).eval()


def tiny_recipe_overrides(**extra) -> dict:
    """Fast settings for tests: 64-token blocks, a few steps per stage."""
    base = {
        "sla2.topk": 0.4, "sla2.block_q": 64, "sla2.block_k": 64,
        "data.frames": 2, "data.height": 18, "data.width": 22, "data.text_len": 6,  # 2*9*11 = 198 tokens
        "calibration.stage1.steps": 3, "calibration.stage2.steps": 3, "calibration.checkpoint_every": 1,
        "calibration.stage1.query_blocks_per_step": 2, "validation.num_samples": 1, "validation.sample_steps": 2,
        "validation.timesteps": [700, 200],
    }
    base.update(extra)
    return base


def write_recipe(path: Path, **overrides) -> Path:
    """A recipe file with the fast test settings (dotted keys -> nested YAML)."""
    tree: dict = {}
    for key, value in tiny_recipe_overrides(**overrides).items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree))
    return path


def dir_snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime_ns, bytes hash)} to prove a folder was not modified."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run(*args, code=0):
    """Invoke the ``slaconv`` CLI in-process (quiet) and assert its exit code; returns Click's result."""
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def fails(code, *args, match):
    """A CLI call that must fail with ``code`` and exactly one ``error: ...`` line containing ``match``."""
    res = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert res.exit_code == code, f"expected {code}, got {res.exit_code}: {res.output} {res.exception!r}"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


class Killed(BaseException):
    """Stands in for SIGKILL: escapes every ``except Exception`` (and the CLI's Ctrl-C handling)."""


def kill_after_checkpoint(monkeypatch, kill_step: int, *args, stage: int | None = None) -> None:
    """Run ``slaconv calibrate ARGS`` in-process and kill it right after it saved checkpoint ``kill_step`` (of
    ``stage``, or of any stage)."""
    from slaconv.calibrate import checkpoints

    real_save = checkpoints.save_checkpoint

    def save_then_die(root, step, *rest, **kwargs):
        path = real_save(root, step, *rest, **kwargs)
        if step == kill_step and (stage is None or Path(root).name == f"stage{stage}"):
            raise Killed()
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(Killed):
            CliRunner().invoke(main, ["-q", "calibrate", *map(str, args)])
    finally:
        monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)


def assert_row_mixing_matches_oracle(mixing: str, oracle, inputs, bq: int, bk: int, topk: float, seed: int):
    """The reference's output under a mixing with a learned ``alpha_weight`` (``query-linear``, ``query-block``)
    and its gradients in q, alpha_logit and alpha_weight against ``oracle(q, k, v, mask, alpha_logit, weight,
    bq, bk)`` in fp64; ``inputs`` = (q, k, v, router_q, router_k, alpha_logit, weight) in fp64."""
    q, k, v, wq, wk, logit, weight = inputs
    n = q.shape[2]
    mask = R.hard_topk_mask(R.router_scores(q.float(), k.float(), wq, wk, bq, bk), R.topk_count(topk, math.ceil(n / bk)))
    leaves = [t.clone().requires_grad_(True) for t in (q, logit, weight)]
    exact = [t.clone().requires_grad_(True) for t in (q, logit, weight)]
    out = R.sla2_attention_reference(leaves[0].float(), k.float(), v.float(), wq, wk, leaves[1].float(), topk=topk,
                                     block_q=bq, block_k=bk, mixing=mixing, alpha_weight=leaves[2].float(), mask=mask)
    want = oracle(exact[0], k, v, mask, exact[1], exact[2], bq, bk)
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5, seed
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, go.float(), allow_unused=True, materialize_grads=True)
    expected = torch.autograd.grad(want, exact, go, allow_unused=True, materialize_grads=True)
    for name, g, e in zip(("q", "alpha_logit", "alpha_weight"), got, expected):
        if topk == 1.0 and name != "q":  # no linear branch: alpha has no effect and no gradient
            assert torch.count_nonzero(g) == 0, name
            continue
        assert e.norm() > 0 and ((g.double() - e).norm() / e.norm()).item() < 1e-4, (seed, name)
