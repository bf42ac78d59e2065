"""tools/convert_checkpoint.py: the original's checkpoints and ours, to .safetensors / .pth, round-tripped."""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import DATA
from test_cls import LOGITS_ATOL

import elsa_swin  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The reference model as the original's training saved it: its names, under "model"."""
    ref = torch.load(DATA / "elsa_swin_cls_narrow.pt", weights_only=False)
    path = tmp_path_factory.mktemp("orig") / "elsa_swin_nano_original.pth"
    torch.save({"model": ref["state_dict"], "epoch": 299}, path)
    return path, ref


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_checkpoint_round_trips_through_timm(tmp_path, original, suffix):
    path, ref = original
    dst = tmp_path / f"nano{suffix}"
    r = convert(path, dst)
    assert r.returncode == 0, r.stderr
    assert "elsa_swin_nano" in r.stdout
    model = timm.create_model(
        "elsa_swin_nano", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(dst), num_classes=10)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["logits"], rtol=0, atol=LOGITS_ATOL)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(dst, "pt") as f:
            assert f.metadata()["architecture"] == "elsa_swin_nano" and "layers.0.blocks.0.attn.ghost_add" in f.keys()


def test_original_checkpoint_loads_through_timm_as_it_is(original):
    path, ref = original
    model = timm.create_model(
        "elsa_swin_nano", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["logits"], rtol=0, atol=LOGITS_ATOL)


def test_inspect_lists_what_maps(original, tmp_path):
    path, _ = original
    r = convert(path, "--inspect")
    assert r.returncode == 0, r.stderr
    assert "elsa_swin_nano, 10 classes" in r.stdout
    assert "missing (the model has, the file lacks): none" in r.stdout
    assert "unexpected (the file has, the model lacks): none" in r.stdout
    broken = torch.load(path, weights_only=False)
    broken["model"].pop("norm.weight")
    broken["model"]["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    r = convert(tmp_path / "broken.pth", "--inspect")
    assert "the file lacks): norm.weight" in r.stdout and "the model lacks): extra.weight" in r.stdout
    r = convert(tmp_path / "broken.pth", tmp_path / "x.safetensors")
    assert r.returncode != 0 and "does not fit elsa_swin_nano" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_ema_and_backbone(tmp_path, original):
    pytest.importorskip("mmengine")
    from elsa_mm import ELSASwin

    path, ref = original
    model = timm.create_model("elsa_swin_nano", num_classes=10)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": model.state_dict(), "state_dict_ema": ema, "epoch": 3, "version": 2}, tmp_path / "ours.pth.tar"
    )
    assert convert(tmp_path / "ours.pth.tar", tmp_path / "ema.safetensors", "--ema").returncode == 0
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "ema.safetensors")["head.fc.bias"], ema["head.fc.bias"])
    r = convert(path, tmp_path / "backbone.pth", "--backbone")
    assert r.returncode == 0, r.stderr
    backbone = ELSASwin(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4)
    missing, unexpected = backbone.load_pretrained(str(tmp_path / "backbone.pth"))
    assert missing == [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")] and unexpected == []
    r = convert(path, tmp_path / "x.pth", "--ema")
    assert r.returncode != 0 and "holds no EMA weights" in r.stderr
    r = convert(tmp_path / "none.pth", tmp_path / "x.pth")
    assert r.returncode != 0 and r.stderr.strip() == f"error: checkpoint {tmp_path / 'none.pth'} does not exist"
