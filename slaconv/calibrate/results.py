"""Writing a stage's trained weights and summary into the work dir."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..workdir import WorkDir

logger = logging.getLogger(__name__)


def save_results(model, family, workdir: Path, update: dict) -> None:
    """Replace the work dir's weights, then its config (written last: it marks completion)."""
    workdir = Path(workdir)
    staging = workdir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        WorkDir(staging).save_model(model, family)
        new_files = {p.name for p in staging.iterdir()}
        for old in workdir.glob("diffusion_pytorch_model*"):
            if old.name not in new_files:
                old.unlink()
        for p in staging.iterdir():
            if p.name != "config.json":
                os.replace(p, workdir / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    work = WorkDir(workdir)
    calibration = dict(work.read_sla2_config().calibration or {})
    calibration.update(update)
    config = work.update_sla2_config(calibration=calibration)
    if config.validation is not None:
        logger.warning("the validation in reports/ measured the earlier weights and is now stale: run "
                       "`slaconv validate` again before pushing")


def data_name(data_dir) -> str:
    """What a summary records about the data: the folder's name (no local paths get published)."""
    return Path(data_dir).name if data_dir else "synthetic"
