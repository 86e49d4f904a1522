"""slaconv: convert diffusers Diffusion-Transformer checkpoints to SLA2 sparse-linear attention."""

__version__ = "0.1.0"


def from_pretrained(*args, **kwargs):
    """Load an SLA2 model (Hub repo id or folder); see :func:`slaconv.loading.from_pretrained`."""
    from .loading import from_pretrained as _from_pretrained

    return _from_pretrained(*args, **kwargs)


__all__ = ["__version__", "from_pretrained"]
