"""The binary wheel of tools/build_wheel.sh, installed into a fresh virtual environment outside the source tree
with no CUDA toolkit on PATH, and the sdist.

The wheel is built with this environment's settings (FORCE_CUDA, TORCH_CUDA_ARCH_LIST), those the library of
the tree was built with, so that it reuses the objects in build/ and only links them again."""

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Run by the fresh environment's python, from a folder outside the tree.
IN_THE_NEW_ENVIRONMENT = """
import importlib.util, sys
from pathlib import Path
import timm, torch
import elsa_cls, elsa_op, elsa_swin
from elsa_op import elsa_function, elsa_reference
packages = [elsa_op, elsa_swin, elsa_cls]
if all(importlib.util.find_spec(m) for m in ("mmengine", "mmcv", "mmdet", "mmseg")):
    import elsa_mm
    packages.append(elsa_mm)
for package in packages:
    assert Path(package.__file__).is_relative_to(sys.prefix), package.__file__
g = torch.Generator().manual_seed(0)
x, h = torch.randn(2, 8, 9, 9, generator=g), torch.randn(2, 2, 9, 9, 9, generator=g).softmax(2)
m, a = torch.randn(8, 3, 3, generator=g), torch.randn(8, 3, 3, generator=g)
torch.testing.assert_close(elsa_function(x, h, m, a, kernel_size=3), elsa_reference(x, h, m, a, kernel_size=3))
model = timm.create_model("elsa_swin_tiny").eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
print("ok", len(packages), "packages")
"""


def test_the_wheel_installs_and_runs_outside_the_tree_without_nvcc(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(
        ["bash", "tools/build_wheel.sh", sys.executable, str(dist)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("elsa_vision-*.whl")
    minor = ".".join(torch.__version__.split(".")[:2])
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert [n for n in names if re.fullmatch(r"elsa_op/_C\.[\w-]+\.so", n)], names
    assert not [n for n in names if "/csrc/" in n]
    assert f"Requires-Dist: torch=={minor}.*" in metadata.splitlines()

    # A fresh environment that sees this one's packages (torch, timm, ...) through a path line in a .pth file.
    # Such a line adds the folder alone and runs none of the .pth files in it, so the editable install of the
    # source tree stays out of sight.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sorted({str(Path(torch.__file__).parents[1]), *site.getsitepackages()})
    (Path(site_packages) / "base_environment.pth").write_text("".join(p + "\n" for p in ours))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    assert shutil.which("nvcc", path=env["PATH"]) is None
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index"]
    r = subprocess.run([*pip, "--ignore-installed", str(wheel)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    r = subprocess.run([python, "-c", IN_THE_NEW_ENVIRONMENT], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    mm = all(importlib.util.find_spec(m) for m in ("mmengine", "mmcv", "mmdet", "mmseg"))
    assert r.stdout.split() == ["ok", "4" if mm else "3", "packages"], r.stdout

    # Under another torch minor the import stops with one line (the version is faked: the check reads it
    # before loading the library).
    r = subprocess.run(
        [python, "-c", "import torch; torch.__version__ = '2.99.0'; import elsa_op"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"ImportError: this elsa-vision wheel was built for torch {minor}, but torch 2.99.0 is installed: install "
        f"the elsa-vision wheel built for torch 2.99, or torch {minor}, or build from source "
        "(`pip install --no-build-isolation -e .` in the source tree)"
    )


def test_an_sdist_builds_with_the_sources(tmp_path):
    """The sdist holds what a build from it needs: setup.py, the arch policy and every C++/CUDA source."""
    r = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sdist = tmp_path / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "elsa_op" / "csrc").rglob("*")
        if p.suffix in (".h", ".cuh", ".cpp", ".cu")
    }
    missing = ({"setup.py", "pyproject.toml", "elsa_op/_archs.py", "PKG-INFO"} | sources) - names
    assert not missing, missing
    assert os.path.basename(sdist).startswith("elsa_vision-")
