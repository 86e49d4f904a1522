"""``slaconv inspect``: what an SLA2 work dir or Hub repo holds, without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checksums import CHECKSUMS_FILE
from .config import FORMAT_NAME
from .hubfetch import fetch_snapshot
from .validation_state import hub_validation_state, validation_state
from .workdir import WorkDir


def inspect_target(target: str, revision: str | None = None) -> dict:
    """Layers, top-k, real sparsity (if validated), alpha per head, the attention mass the initial router's
    blocks held at convert time (``alpha_init: calibrate``), stage summaries, and whether the validation
    measured these weights (a local folder's files are hashed; a Hub repo is checked against its
    ``checksums.sha256``, without downloading the weights)."""
    path = Path(target)
    local = path.exists()
    if not local:
        path = fetch_snapshot(target, revision=revision, what="SLA2 model",
                              allow_patterns=[WorkDir.SLA2_CONFIG, WorkDir.SLA2_STATE, WorkDir.MODEL_CONFIG,
                                              WorkDir.VALIDATION_REPORT, CHECKSUMS_FILE])
    work = WorkDir(path)
    config = work.read_sla2_config()
    freshness = validation_state(work) if local else hub_validation_state(work)
    state = work.read_sla2_state()
    report = work.read_validation_report() or {}
    # a stale report's per-layer figures describe other weights: not shown beside these
    validation = {x["layer"]: x for x in report.get("layers", [])} if freshness.status != "stale" else {}
    initial_mass = ((config.alpha_init or {}).get("selected_mass") or {}).get("per_head", {})
    layers = []
    for name in config.layers:
        logit = state.get(f"{name}.alpha_logit")
        rq = state.get(f"{name}.router_q")
        eye = torch.eye(rq.shape[-1]).expand_as(rq) if rq is not None else None
        layers.append({
            "layer": name,
            "topk": config.attention.topk_for(name),
            "alpha": [round(float(a), 4) for a in torch.sigmoid(logit)] if logit is not None else None,
            "initial_mass": (round(sum(initial_mass[name]) / len(initial_mass[name]), 4)
                             if initial_mass.get(name) else None),
            "router_moved": None if rq is None else round(float((rq - eye).norm() / eye.norm()), 4),
            "sparsity": validation.get(name, {}).get("sparsity"),
            "attention_rel_l2": validation.get(name, {}).get("attention_rel_l2"),
        })
    attention = config.attention
    return {
        "target": target,
        "format": f"{FORMAT_NAME} v{attention.format_version}",
        "family": config.family,
        "base_model": config.base_model,
        "block_q": attention.block_q, "block_k": attention.block_k, "topk": attention.topk,
        "quant": attention.quant, "feature_map": attention.feature_map,
        "layers": layers,
        "calibration": config.calibration,
        "validation": config.validation,
        "validation_state": freshness.to_dict(),
    }


def render(info: dict) -> str:
    """The human-readable table of :func:`inspect_target`'s result."""
    base = info.get("base_model") or {}
    lines = [
        f"{info['target']}: {info['format']}, family {info['family']}, base {base.get('id') or base.get('name')}",
        f"blocks {info['block_q']}x{info['block_k']}, topk {info['topk']}, quant {info['quant']}, "
        f"feature map {info['feature_map']}, {len(info['layers'])} SLA2 layers",
        "",
        f"{'layer':<28} {'topk':>6} {'sparsity':>9} {'rel.L2':>8} {'init mass':>9} {'router moved':>13}  alpha per head",
    ]
    for x in info["layers"]:
        sp = f"{x['sparsity']:.3f}" if x["sparsity"] is not None else "-"
        err = f"{x['attention_rel_l2']:.4f}" if x["attention_rel_l2"] is not None else "-"
        mass = f"{x['initial_mass']:.3f}" if x.get("initial_mass") is not None else "-"
        alpha = " ".join(f"{a:.2f}" for a in (x["alpha"] or []))
        lines.append(f"{x['layer']:<28} {x['topk']:>6} {sp:>9} {err:>8} {mass:>9} {x['router_moved']!s:>13}  {alpha}")
    if info.get("calibration"):
        lines += ["", "calibration: " + json.dumps(info["calibration"], default=str)]
    state = info["validation_state"]
    lines += ["", f"validation: {state['label']}"]
    if info.get("validation"):
        of = " (of other weights)" if state["status"] == "stale" else ""
        lines += [f"validation summary{of}: " + json.dumps(info["validation"], default=str)]
    return "\n".join(lines)
