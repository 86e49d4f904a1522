"""Nested training state (model, optimizer, scheduler) as safetensors + JSON, never pickle.

Tensors go to ``state.safetensors`` under their path in the nested structure; everything else
(numbers, strings, lists, ``None``) goes to ``state.json`` with tensors replaced by references.
Dict keys keep their type (``int`` optimizer param ids survive the round trip).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError
from .utils.messages import first_line

_TENSOR = "__tensor__"


def _key(k) -> str:
    return f"i:{k}" if isinstance(k, int) else f"s:{k}"


def _unkey(k: str):
    return int(k[2:]) if k.startswith("i:") else k[2:]


def _flatten(obj, path: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {_key(k): _flatten(v, f"{path}/{_key(k)}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {_unkey(k): _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(folder: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    # safetensors refuses tensors that share storage; clone to be safe.
    save_file({k: v.clone() for k, v in tensors.items()}, str(Path(folder) / "state.safetensors"))
    (Path(folder) / "state.json").write_text(json.dumps(tree))


def load_state(folder: Path) -> dict:
    """The state :func:`save_state` wrote to ``folder``; :class:`InputError` naming the file when one of the two
    files is missing, truncated or not what :func:`save_state` writes."""
    folder = Path(folder)
    blob, tree = folder / "state.safetensors", folder / "state.json"
    try:
        tensors = load_file(str(blob))
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{blob} is corrupt or unreadable ({first_line(exc)})") from None
    try:
        return _unflatten(json.loads(tree.read_text()), tensors)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{tree} is corrupt or unreadable ({first_line(exc)})") from None
