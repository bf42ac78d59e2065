"""The installed project: import boundaries, no hand-made import paths, and safe checkpoint loading."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

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


def test_importing_elsa_mm_only_registers():
    pytest.importorskip("mmengine")
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
    """Scripts, tools, tests and benchmarks import the installed packages."""
    hits = []
    for path in REPO.rglob("*"):
        if ".venv" in path.parts or ".git" in path.parts or path.suffix not in (".py", ".sh") or not path.is_file():
            continue
        text = path.read_text()
        for needle in ("sys." + "path", "PYTHON" + "PATH", "elsa." + "pth"):
            if needle in text:
                hits.append(f"{path.relative_to(REPO)}: {needle}")
    assert hits == []


# ---- checkpoints that would run code -------------------------------------------------------------
class _Planted:
    """Unpickling this touches a file: a stand-in for any code a downloaded file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def planted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "planted.pth"
    import timm

    import elsa_swin  # noqa: F401

    weights = timm.create_model("elsa_swin_nano", num_classes=2).state_dict()
    torch.save({"state_dict": weights, "epoch": 0, "version": 2, "payload": _Planted(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):  # what plain torch.load does too
        torch.load(path, weights_only=True)
    assert not marker.exists()
    return path, marker


def _tiny_image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (i * 90, 30, 200)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "tool,flag", [("train.py", "--resume"), ("train.py", "--initial-checkpoint"), ("validate.py", "--checkpoint")]
)
def test_cls_tools_refuse_code_in_checkpoints(tmp_path, planted, tool, flag):
    path, marker = planted
    data = _tiny_image_folder(tmp_path / "data")
    args = [
        str(REPO / "cls" / tool),
        str(data),
        "--model",
        "elsa_swin_nano",
        "--img-size",
        "32",
        "-j",
        "0",
        flag,
        str(path),
    ]
    if tool == "train.py":
        args += ["--epochs", "1", "--output", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: refusing to load checkpoint {path}") and "unpickle getattr" in last, r.stderr[
        -2000:
    ]
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_backbone_pretrained_refuses_code_in_checkpoints(planted):
    pytest.importorskip("mmengine")
    from elsa_mm import ELSASwin
    from elsa_swin import CheckpointError

    path, marker = planted
    backbone = ELSASwin(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        group_width=4,
        init_cfg=dict(type="Pretrained", checkpoint=str(path)),
    )
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        backbone.init_weights()
    assert not marker.exists()


@pytest.mark.parametrize(
    "project,config",
    [
        ("det", "configs/elsa_swin/mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"),
        ("seg", "configs/elsa_swin/upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"),
    ],
)
def test_mm_test_tools_refuse_code_in_checkpoints(tmp_path, planted, project, config):
    pytest.importorskip("mmdet" if project == "det" else "mmseg")
    path, marker = planted
    r = subprocess.run(
        [sys.executable, "tools/test.py", config, str(path), "--work-dir", str(tmp_path / "w")],
        cwd=REPO / project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: refusing to load checkpoint {path}"), r.stderr[-2000:]
    assert not marker.exists()


def test_safetensors_and_truncated_files(tmp_path):
    import timm
    from safetensors.torch import save_file

    from elsa_cls.inference import load_weights
    from elsa_swin import CheckpointError, load_checkpoint_file

    model = timm.create_model("elsa_swin_nano", num_classes=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    other = timm.create_model("elsa_swin_nano", num_classes=3)
    load_weights(other, load_checkpoint_file(tmp_path / "w.safetensors"), "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))

    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'cut.pth'} is truncated"):
        load_checkpoint_file(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_checkpoint_file(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "none.pth")
