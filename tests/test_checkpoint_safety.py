"""Checkpoints: loading one never runs code it carries, in the library and in every tool that takes a
checkpoint, and a truncated, unreadable or missing file is an error that names it."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cls_helpers import tool_error
from PIL import Image

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin import CheckpointError, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this touches a file: a stand-in for any code a downloaded file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def planted(tmp_path):
    """(path, marker): a checkpoint with real weights and a payload that would create `marker` if unpickled."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "planted.pth"
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
    "tool,flag", [("train", "--resume"), ("train", "--initial-checkpoint"), ("validate", "--checkpoint")]
)
def test_cls_tools_refuse_code_in_checkpoints(tmp_path, planted, tool, flag):
    path, marker = planted
    data = _tiny_image_folder(tmp_path / "data")
    args = [str(data), "--model", "elsa_swin_nano", "--img-size", "32", "-j", "0", flag, str(path)]
    if tool == "train":
        args += ["--epochs", "1", "--output", str(tmp_path / "out")]
    error = tool_error(tool, args)
    assert error.startswith(f"error: refusing to load checkpoint {path}") and "unpickle getattr" in error, error
    assert not marker.exists()


@pytest.mark.mm
def test_backbone_pretrained_refuses_code_in_checkpoints(planted):
    from elsa_mm import ELSASwin

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


# The det/seg tools run as a user runs them: mmengine's Runner sets up logging, registries and the loader.
@pytest.mark.mm
@pytest.mark.parametrize(
    "project,config",
    [
        ("det", "configs/elsa_swin/mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py"),
        ("seg", "configs/elsa_swin/upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py"),
    ],
)
def test_mm_test_tools_refuse_code_in_checkpoints(tmp_path, planted, project, config):
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
    from safetensors.torch import save_file

    from elsa_swin import load_weights

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


def test_validate_names_a_truncated_checkpoint(tmp_path):
    data = _tiny_image_folder(tmp_path / "d")
    path = tmp_path / "cut.pth.tar"
    torch.save({"state_dict": timm.create_model("elsa_swin_nano").state_dict()}, path)
    path.write_bytes(path.read_bytes()[:5000])
    error = tool_error("validate", [str(data), "--model", "elsa_swin_nano", "--checkpoint", str(path), "-j", "0"])
    assert f"error: checkpoint {path} is truncated" in error


def test_create_from_checkpoint(tmp_path):
    """The tools' one way from a file to a model: the head's class count, the original's names mapped, EMA
    weights only where they exist, and a clear error for an unknown model or weights that do not fit."""
    from elsa_swin import create_from_checkpoint, head_classes, unwrap_state_dict

    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_nano", num_classes=4, img_size=64)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema}, tmp_path / "run.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")
    run, plain = load_checkpoint_file(tmp_path / "run.pth"), load_checkpoint_file(tmp_path / "plain.pth")

    assert head_classes(unwrap_state_dict(plain)) == 4 and head_classes({"x": torch.zeros(1)}) is None
    loaded = create_from_checkpoint("elsa_swin_nano", run, "run.pth", img_size=64, use_ema=True)
    assert loaded.num_classes == 4
    torch.testing.assert_close(loaded.head.fc.bias, ema["head.fc.bias"])
    with pytest.raises(CheckpointError, match="plain.pth holds no EMA weights"):
        create_from_checkpoint("elsa_swin_nano", plain, "plain.pth", img_size=64, use_ema=True)
    with pytest.raises(CheckpointError, match="plain.pth does not fit"):
        create_from_checkpoint("elsa_swin_tiny", plain, "plain.pth", img_size=64)
    with pytest.raises(ValueError, match="unknown model 'elsa_swin_huge'"):
        create_from_checkpoint("elsa_swin_huge", plain, "plain.pth")
