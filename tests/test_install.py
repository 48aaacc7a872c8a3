"""scripts/install.sh: where the CPU torch wheel comes from, and the vLLM versions each mode accepts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def torch_source(find_links: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    if find_links is not None:
        env["PIP_FIND_LINKS"] = find_links
    done = subprocess.run(["bash", "scripts/install.sh", "--print-torch-source"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def _pinned_torch() -> str:
    pins = [line for line in (REPO / "constraints-cpu.txt").read_text().splitlines() if line.startswith("torch==")]
    return pins[0].split("==")[1]


@pytest.fixture
def wheels(tmp_path) -> Path:
    (tmp_path / "wheels").mkdir()
    return tmp_path / "wheels"


def test_a_find_links_folder_with_the_pinned_cpu_wheel_is_used_as_is(wheels, tmp_path):
    (wheels / f"torch-{_pinned_torch()}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert torch_source(str(wheels)) == "find-links"
    assert torch_source(f"{tmp_path / 'elsewhere'} file://{wheels}") == "find-links"  # any listed folder


@pytest.mark.parametrize("present", [None, "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                                     "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"])
def test_without_the_pinned_cpu_wheel_the_pytorch_cpu_index_is_added(wheels, present):
    if present:  # a CUDA/PyPI build, or another CPU version, does not satisfy torch==2.13.0+cpu
        (wheels / present).write_bytes(b"")
    assert torch_source(str(wheels)) == INDEX
    assert torch_source(None) == INDEX
    assert torch_source(str(wheels / "missing")) == INDEX


def test_the_install_script_pins_the_same_torch_as_the_constraints():
    assert f'TORCH_CPU="{_pinned_torch()}"' in (REPO / "scripts" / "install.sh").read_text()


def test_the_gpu_extra_accepts_the_vllm_minor_release_the_cpu_build_pins():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = Requirement(extras["cpu"][0])
    gpu = next(Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm")
    cpu_version = next(iter(cpu.specifier)).version
    assert gpu.specifier.contains(cpu_version)
    major, minor = cpu_version.split(".")[:2]
    assert not gpu.specifier.contains(f"{major}.{int(minor) + 1}.0")  # newer internals are untested
    assert not gpu.specifier.contains(f"{major}.{int(minor) - 1}.0")
