"""The installed project: import boundaries, each in a fresh interpreter, and no hand-made import paths."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", **kwargs)


def test_elsa_op_imports_with_torch_alone():
    r = python(
        "import sys; sys.modules['timm'] = None; sys.modules['mmengine'] = None\n"
        "import elsa_op, torch\n"
        "layer = elsa_op.ELSAAttention(16, 2, kernel_size=3, group_width=4)\n"
        "print(tuple(layer(torch.randn(1, 5, 6, 16)).shape))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(1,", "5,", "6,", "16)"]


def test_every_package_is_installed_outside_the_working_directory():
    r = python("import elsa_op, elsa_swin, elsa_cls, timm; timm.create_model('elsa_swin_nano'); print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.mm
def test_importing_elsa_mm_only_registers():
    r = python(
        "import torch\n"
        "from mmengine.logging.history_buffer import HistoryBuffer\n"
        "from mmengine.registry import HOOKS, MODELS\n"
        "before = HistoryBuffer.__getstate__\n"
        "import elsa_mm, argparse, numpy\n"
        "ours = (HistoryBuffer, argparse.Namespace, numpy.ndarray)\n"
        "assert HistoryBuffer.__getstate__ is before\n"
        "assert not any(g in ours for g in torch.serialization.get_safe_globals())\n"
        "assert MODELS.get('ELSASwin') is elsa_mm.ELSASwin and HOOKS.get('SafeCheckpointHook') is not None\n"
        "elsa_mm.allow_mmengine_checkpoints()\n"
        "assert HistoryBuffer in torch.serialization.get_safe_globals()\n"
        "print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_hand_made_import_paths():
    """Scripts, tools, tests and benchmarks import the installed packages.

    The one exception is tools/gpu_check.sh, which runs a bare checkout on a GPU machine that has torch
    but cannot install anything: it puts the checkout on the import path, and nothing else may.
    """
    exempt = {("tools/gpu_check.sh", "PYTHON" + "PATH")}
    hits = []
    for path in REPO.rglob("*"):
        if ".venv" in path.parts or ".git" in path.parts or path.suffix not in (".py", ".sh") or not path.is_file():
            continue
        text = path.read_text()
        for needle in ("sys." + "path", "PYTHON" + "PATH", "elsa." + "pth"):
            if needle in text and (path.relative_to(REPO).as_posix(), needle) not in exempt:
                hits.append(f"{path.relative_to(REPO)}: {needle}")
    assert hits == []


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / ".venv").resolve(), reason="runs where `bash run.sh` set up .venv/"
)
def test_a_second_setup_compiles_nothing():
    """`bash run.sh setup` again, in the environment that built the library (CI's, or a user's `bash run.sh
    test`): no object of build/ and not the library is written again, and it takes seconds."""
    built = sorted(REPO.glob("build/temp.*/**/*.o")) + sorted((REPO / "elsa_op").glob("_C*.so"))
    assert built, "no objects in build/: the library was not built by setup.py in this tree"
    before = {p: p.stat().st_mtime_ns for p in built}
    r = subprocess.run(["bash", "run.sh", "setup"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in built} == before, "a second setup compiled or linked again"
    log = (REPO / ".venv" / "build_ext.log").read_text()
    assert "c++ " not in log and "nvcc " not in log, log
