"""``slaconv prepare``: build a ``--data`` folder from media + captions with a Wan pipeline's VAE and T5.

One module per step:

* :mod:`.captions`: the captions file or folder -> :class:`Item` s (media path + caption);
* :mod:`.media`: each item's frames (images, animations, frame folders, videos), cropped and resized;
* :mod:`.pipeline`: the diffusers pipeline folder or Hub id, checked; its VAE and text encoder loaded;
* :mod:`.encoding`: captions -> ``prompt_embeds`` and frames -> ``latents``, as ``WanPipeline`` does;
* :mod:`.dataset`: :func:`plan` (a dry run) and :func:`prepare_dataset`, which drive the steps above.
"""

from .captions import Item, read_captions
from .dataset import GENERATOR, STORE_DTYPES, TEXT_BATCH, plan, prepare_dataset
from .encoding import encode_prompts, encode_video, prompt_clean
from .media import fit_frame, load_video, probe
from .pipeline import check_pipeline, load_text_encoder, load_vae, resolve_pipeline

__all__ = [
    "GENERATOR", "STORE_DTYPES", "TEXT_BATCH", "Item", "check_pipeline", "encode_prompts", "encode_video",
    "fit_frame", "load_text_encoder", "load_vae", "load_video", "plan", "prepare_dataset", "probe",
    "prompt_clean", "read_captions", "resolve_pipeline",
]
