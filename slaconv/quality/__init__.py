"""The SLA2 quality benchmark: a small video DiT trained on SynthVideo, converted by the real slaconv CLI.

Run as modules, in this order (``--smoke`` runs each at CPU size):

    python -m slaconv.quality.train_dit --out OUT/dit                   # the original model
    python -m slaconv.quality.train_classifier --out OUT/classifier --score-model OUT/dit/model   # the judge
    python -m slaconv.quality.table --model OUT/dit/model --classifier OUT/classifier --out OUT/quality
    python -m slaconv.quality.attention_stats --model OUT/dit/model --out OUT/attention

Modules: ``synthvideo`` (the generator) with ``render`` (its renderer) and ``images`` (PNG drawing);
``common`` (model configs, streams, the sampler) and ``metrics``; ``table`` (the driver) with
``table_settings``, ``slaconv_cli`` (running the CLI's verbs), ``workdirs`` (per-row work dirs and
ablation edits), ``scoring`` and ``report``; ``command_line`` (argument types, one-line errors).
"""
