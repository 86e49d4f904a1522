"""``slaconv inspect``: what an SLA2 work dir or Hub repo holds, without loading the model."""

from __future__ import annotations

from pathlib import Path

import torch

from .checksums import CHECKSUMS_FILE
from .config import FORMAT_NAME
from .hubfetch import fetch_snapshot
from .text_table import fields, number, table
from .token_order import describe
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
    allocated = (config.budget or {}).get("layers", {})
    layers = []
    for name in config.layers:
        logit = state.get(f"{name}.alpha_logit")
        weight = state.get(f"{name}.alpha_weight")
        rq = state.get(f"{name}.router_q")
        eye = torch.eye(rq.shape[-1]).expand_as(rq) if rq is not None else None
        layers.append({
            "layer": name,
            "topk": config.attention.topk_for(name),
            "blocks": allocated.get(name, {}).get("blocks"),
            "alpha": [round(float(a), 4) for a in torch.sigmoid(logit)] if logit is not None else None,
            # query-linear, query-block: how far alpha moves with the query, |w_h| per head (the logit moves by
            # |w| |q| / sqrt(d))
            "alpha_weight_norm": None if weight is None else [round(float(x), 4) for x in weight.norm(dim=-1)],
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
        "quant": attention.quant, "feature_map": attention.feature_map, "mixing": attention.mixing,
        "linear_keys": attention.linear_keys,
        "token_order": describe(attention.token_tile),
        "budget": (config.budget or {}).get("method", "uniform"),
        "layers": layers,
        "calibration": config.calibration,
        "validation": config.validation,
        "validation_state": freshness.to_dict(),
    }


MIXING_WORDS = {"head": "per head", "query": "per query (from the tail mass)",
                "query-linear": "per query (from the query)",
                "query-block": "per query (from the query and its block's tail mass)"}


def render(info: dict) -> str:
    """The human-readable text of :func:`inspect_target`'s result: aligned tables, 4 significant digits."""
    base = info.get("base_model") or {}
    lines = [
        f"{info['target']}: {info['format']}, family {info['family']}, base {base.get('id') or base.get('name')}",
        f"blocks {info['block_q']}x{info['block_k']}, topk {info['topk']}, quant {info['quant']}, "
        f"feature map {info['feature_map']}, alpha {MIXING_WORDS[info['mixing']]}, "
        f"linear branch over {info['linear_keys']} keys, token order {info['token_order']}, "
        f"{len(info['layers'])} SLA2 layers",
    ]
    if info["budget"] != "uniform":
        lines.append(f"budget {info['budget']}: each layer's top-k and key blocks allocated at convert")
    lines.append("")
    rows = [[x["layer"], number(x["topk"]) + (f" ({x['blocks']} blocks)" if x.get("blocks") else ""),
             number(x["sparsity"]), number(x["attention_rel_l2"]),
             number(x.get("initial_mass")), number(x["router_moved"]),
             " ".join(f"{a:.2f}" for a in (x["alpha"] or [])) or "-"] for x in info["layers"]]
    headers = ["layer", "topk", "sparsity", "rel. L2", "init mass", "router moved", "alpha per head"]
    if any(x.get("alpha_weight_norm") for x in info["layers"]):
        headers[-1] = "alpha at q = 0"
        headers.append("|alpha weight|")
        for row, x in zip(rows, info["layers"]):
            row.append(" ".join(f"{a:.2f}" for a in (x.get("alpha_weight_norm") or [])) or "-")
    lines += table(headers, rows)
    calibration = info.get("calibration") or {}
    if calibration:
        lines += ["", "calibration:", *fields({k: v for k, v in calibration.items() if not isinstance(v, dict)})]
        for stage, summary in calibration.items():
            if isinstance(summary, dict):
                lines += [f"  {stage}:", *fields(summary, skip=("loss_curve",), indent="    ")]
    state = info["validation_state"]
    lines += ["", f"validation: {state['label']}"]
    if info.get("validation"):
        of = " (of other weights)" if state["status"] == "stale" else ""
        lines += [f"validation summary{of}:", *fields(info["validation"], skip=("weights_digest",))]
        if info["validation"].get("weights_digest"):
            lines += [f"  measured weights: {info['validation']['weights_digest']}"]
    return "\n".join(lines)
