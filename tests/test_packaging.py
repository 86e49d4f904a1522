"""The installed package as a user meets it: run from a checkout of the repository, nothing in the
checkout hides an installed distribution (a top-level ``kernels/`` once hid Hugging Face's ``kernels``,
which diffusers probes), and the lock file pins every dependency the package names."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def _python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run this interpreter from the repository root, as a user who just cloned it would."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _importable_from_root() -> set[str]:
    """Top-level names ``import`` finds in the repository root: modules, packages, and namespace
    folders holding Python files."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and next(entry.rglob("*.py"), None) is not None:
            names.add(entry.name)
    return names


def test_hub_kernels_package_is_installed():
    # the shadowing checks below mean nothing without it: a missing package is a broken environment
    assert importlib.util.find_spec("kernels") is not None, "Hugging Face's `kernels` is not installed"
    assert importlib.metadata.version("kernels")


def test_no_repository_folder_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    names = _importable_from_root()
    assert "slaconv" in names
    clashes = {name: owners[name] for name in names - {"slaconv"} if name in owners}
    assert not clashes, f"repository folders hide installed packages when run from the root: {clashes}"


def test_import_kernels_from_the_root_finds_site_packages():
    code = ("import json, sysconfig, kernels; p = sysconfig.get_paths(); "
            "print(json.dumps([kernels.__file__, p['purelib'], p['platlib']]))")
    res = _python("-c", code)
    assert res.returncode == 0, res.stderr[-2000:]
    origin, *site_dirs = json.loads(res.stdout)
    assert any(Path(origin).is_relative_to(d) for d in site_dirs), (origin, site_dirs)


def test_diffusers_attention_dispatch_imports_from_the_root():
    code = ("from diffusers.utils import is_kernels_available; "
            "import diffusers.models.attention_dispatch as d; "
            "print(is_kernels_available(), d.AttentionBackendName.NATIVE.value)")
    res = _python("-c", code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "native"], res.stdout


def test_python_m_slaconv_help():
    res = _python("-m", "slaconv", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "convert" in res.stdout and "env" in res.stdout and "Exit codes" in res.stdout


def test_env_reports_versions_gpus_and_backend():
    res = _python("-m", "slaconv", "env")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in res.stdout.splitlines())
    assert lines["slaconv"] == importlib.metadata.version("slaconv")
    assert lines["diffusers"] == importlib.metadata.version("diffusers")
    assert lines["torch"].startswith(importlib.metadata.version("torch"))
    assert lines["CUDA available"] in ("yes", "no")
    assert {"SLACONV_BACKEND", "TRITON_INTERPRET", "HF_HUB_OFFLINE", "HF_HOME"} <= set(lines)


def test_env_json_follows_slaconv_backend():
    import torch

    res = _python("-m", "slaconv", "env", "--json", env={"SLACONV_BACKEND": "reference", "HF_HOME": "/nowhere"})
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    assert info["packages"]["safetensors"] == importlib.metadata.version("safetensors")
    assert info["cuda_available"] == torch.cuda.is_available() and len(info["gpus"]) == torch.cuda.device_count()
    backend = info["attention_backend"]
    assert backend.pop("device") in ("cpu", "cuda")
    assert set(backend) == {"head_dim_64", "head_dim_128", "other_head_dims"}
    assert set(backend.values()) == {"reference"}
    assert info["env"]["SLACONV_BACKEND"] == "reference" and info["env"]["HF_HOME"] == "/nowhere"


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[_normalize(name)] = version
    return pins


def test_lock_pins_every_dependency_the_package_names():
    pins = _locked()
    for version in pins.values():
        assert "+" not in version, f"{LOCK.name} keeps a local version label: {version}"
    requirements = [Requirement(r) for r in importlib.metadata.requires("slaconv") or ()]
    # the GPU benchmarks' extra is installed from wheels on the GPU machines, never by `make setup`
    requirements = [r for r in requirements if str(r.marker) != 'extra == "bench"']
    missing = sorted({_normalize(r.name) for r in requirements} - set(pins))
    assert not missing, f"{LOCK.name} does not pin {missing}; run `make lock`"
    outside = [f"{r.name}=={pins[_normalize(r.name)]} ({r.specifier})" for r in requirements
               if not r.specifier.contains(pins[_normalize(r.name)], prereleases=True)]
    assert not outside, f"{LOCK.name} pins versions pyproject.toml does not allow: {outside}; run `make lock`"
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert Version(pins["torch"]) == Version(torch_pin)
