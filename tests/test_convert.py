"""tools/convert_checkpoint.py: the original's checkpoints and ours, to .safetensors / .pth, round-tripped."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cls_helpers import DATA, LOGITS_ATOL

import elsa_swin  # noqa: F401
from elsa_swin import checkpoint_filter_fn

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


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our classifier's tensors under the original code's names and layout: downsampling at the end of a
    stage, pre_proj/post_proj/rb window attention with (v, q, k) projections and a (heads, positions) bias
    table indexed by key - query, both ghost kernels packed in one ghost_head, a plain linear head."""
    out = {}
    window_stages = {k.split(".blocks.")[0] for k in state if k.endswith("relative_position_bias_table")}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")) or k.endswith(("ghost_mul", "ghost_add")):
            continue
        if k.startswith(tuple(s + ".blocks." for s in window_stages)):
            k = k.replace(".attn.qkv.", ".attn.pre_proj.").replace(".attn.proj.", ".attn.post_proj.")
            if ".attn.pre_proj." in k:
                q, kk, vv = v.chunk(3)
                v = torch.cat([vv, q, kk])
            if k.endswith("relative_position_bias_table"):
                k, v = k.replace("relative_position_bias_table", "rb"), v.flip(0).t()
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v.clone()
    for k in state:
        if k.endswith("ghost_add") or (k.endswith("ghost_mul") and k[: -len("mul")] + "add" not in state):
            prefix = k.rsplit(".", 1)[0]
            kernels = [state[f"{prefix}.{n}"] for n in ("ghost_mul", "ghost_add") if f"{prefix}.{n}" in state]
            packed = torch.stack(kernels)[:, None] if len(kernels) == 2 else kernels[0][None]
            out[f"{prefix}.ghost_head"] = packed.clone()
    return out


def test_to_original_inverts_the_mapping_of_the_reference(original):
    """The helper below writes the original's layout exactly as the reference checkpoint has it."""
    _, ref = original
    model = timm.create_model("elsa_swin_nano", num_classes=10)
    model.load_state_dict(checkpoint_filter_fn(ref["state_dict"], model))
    want = {k: v for k, v in ref["state_dict"].items() if not k.endswith(("relative_id", "attn_mask"))}
    got = to_original(model.state_dict())
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


CUSTOM = dict(
    embed_dim=48,
    depths=(2, 2, 4, 2),
    num_heads=(2, 4, 8, 16),
    window_size=5,
    kernel_size=5,
    group_width=8,
    mlp_ratio=3.0,
)


@pytest.mark.parametrize("ghosts", ["add", "mul_and_add"])
def test_any_architecture_converts(tmp_path, ghosts):
    """An ELSA-Swin of no registered size, saved in the original's layout, converts from its own keys and
    shapes, and the architecture in the file's metadata rebuilds it with the same logits."""
    torch.manual_seed(0)
    extra = dict(lam=1.0, gamma=1.0) if ghosts == "mul_and_add" else {}
    source = timm.create_model("elsa_swin_tiny", num_classes=7, **CUSTOM, **extra).eval()
    with torch.no_grad():  # away from the init, so zero biases and near-zero ghost kernels are exercised too
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    src = tmp_path / "custom_original.pth"
    torch.save({"model": to_original(source.state_dict()), "epoch": 9}, src)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = source(x)
    lam_args = ["--lam", "1"] if extra else []
    if extra:
        r = convert(src, "--inspect")
        assert r.returncode != 0 and "give --lam" in r.stderr
    r = convert(src, "--inspect", *lam_args)
    assert r.returncode == 0, r.stderr
    assert "elsa_swin_tiny, 7 classes" in r.stdout and "depths=(2, 2, 4, 2)" in r.stdout and "window_size=5" in r.stdout
    assert "missing (the model has, the file lacks): none" in r.stdout
    for suffix in (".safetensors", ".pth"):
        dst = tmp_path / f"custom{suffix}"
        r = convert(src, dst, *lam_args)
        assert r.returncode == 0, r.stderr
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(dst, "pt") as f:
                meta = f.metadata()
            kwargs, name = json.loads(meta["model_kwargs"]), meta["architecture"]
        else:
            saved = torch.load(dst, weights_only=True)
            kwargs, name = saved["model_kwargs"], saved["arch"]
        assert name == "elsa_swin_tiny"
        assert json.loads(json.dumps(kwargs)) == {
            "in_chans": 3,
            "patch_size": 4,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in CUSTOM.items()},
            "elsa_stages": [True, True, True, False],
            "lam": extra.get("lam", 0.0),
            "gamma": 1.0,
            "qkv_bias": True,
        }
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(dst), num_classes=7), **kwargs
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=0, atol=LOGITS_ATOL)
        assert f'pretrained_cfg_overlay=dict(file="{dst}", num_classes=7)' in r.stdout


def test_conversion_refuses_what_it_cannot_rebuild(tmp_path, original):
    path, ref = original
    state = dict(ref["state_dict"])
    state["layers.1.blocks.1.attn.attn.0.weight"] = state["layers.1.blocks.1.attn.attn.0.weight"][..., :5, :5]
    torch.save({"model": state}, tmp_path / "mixed.pth")
    r = convert(tmp_path / "mixed.pth", "--inspect")
    assert r.returncode != 0 and "ELSA kernel sizes differ between blocks ([5, 7])" in r.stderr
    state = dict(ref["state_dict"], absolute_pos_embed=torch.zeros(1, 3136, 32))
    torch.save({"model": state}, tmp_path / "ape.pth")
    r = convert(tmp_path / "ape.pth", tmp_path / "x.safetensors")
    assert r.returncode != 0 and "absolute position embedding" in r.stderr
