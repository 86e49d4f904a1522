"""slaconv: convert diffusers Diffusion-Transformer checkpoints to SLA2 sparse-linear attention.

In Python::

    import slaconv

    slaconv.sla2_(model, slaconv.SLA2Config(topk=0.05))  # a diffusers transformer in memory, in place
    model = slaconv.from_pretrained("org/model-sla2")      # a converted model from the Hub or a folder
    model.save_pretrained("folder")                         # the same layout again (slaconv.save_pretrained)

``sla2_``, ``from_pretrained`` and ``save_pretrained`` are imported on first use, so ``import slaconv`` stays light.
"""

from .config import SLA2Config

__version__ = "0.1.0"

_LAZY = {"sla2_": "install", "from_pretrained": "loading", "save_pretrained": "loading"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "SLA2Config", "from_pretrained", "save_pretrained", "sla2_"]
