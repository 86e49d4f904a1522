"""Shared fixtures. Builders and checks that tests import live in ``helpers.py``, the fake Hub in ``hubfake.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter.  The mode is fixed when a kernel module is
# first imported, and any test may import one, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import make_wan  # noqa: E402
from hubfake import FakeHub, isolate_hf_env  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

FAKE_HUB_TOKEN = "hf_fakehubtoken123456"


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    """A saved tiny Wan transformer (diffusers folder) shared by the session; never modified."""
    folder = tmp_path_factory.mktemp("tiny_wan") / "transformer"
    make_wan().save_pretrained(folder)
    return folder


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A started :class:`hubfake.FakeHub` accepting the token ``hub.test_token``, with huggingface_hub
    isolated from the developer's login and caches (see :func:`hubfake.isolate_hf_env`)."""
    isolate_hf_env(monkeypatch, tmp_path)
    with FakeHub(token=FAKE_HUB_TOKEN) as hub:
        hub.test_token = FAKE_HUB_TOKEN
        yield hub
