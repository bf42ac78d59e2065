"""cls: ELSA-Swin parity with the original, checkpoint mapping, timm surface, train/resume/validate runs."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from cls_helpers import CLS, LOGITS_ATOL, TRAIN_ARGS, read_summary, run, tool_error, write_digits
from PIL import Image

from elsa_swin import checkpoint_filter_fn


def test_parity_with_original_logits(data_dir):
    ref = torch.load(data_dir / "elsa_swin_cls_narrow.pt", weights_only=False)
    model = timm.create_model("elsa_swin_nano", num_classes=10).eval()
    model.load_state_dict(checkpoint_filter_fn(ref["state_dict"], model), strict=False)
    with torch.no_grad():
        logits = model(ref["input"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", ["elsa_swin_tiny", "elsa_swin_small", "elsa_swin_base"])
def test_published_checkpoint_names_map_onto_model(data_dir, name):
    manifest = json.loads((data_dir / "cls_state_dict_manifest.json").read_text())[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        published = {k: torch.empty(shape) for k, shape in manifest["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    mapped = checkpoint_filter_fn(published, model)
    ours = model.state_dict()
    assert sorted(mapped) == sorted(ours)
    for k, v in mapped.items():
        assert v.shape == ours[k].shape, k


def test_timm_surface():
    model = timm.create_model("elsa_swin_nano", num_classes=7, drop_path_rate=0.1, img_size=64)
    cfg = model.pretrained_cfg
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 0.9)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)  # other input sizes
    final, feats = model.forward_intermediates(x)
    assert [f.shape[1:] for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert model.forward_head(final, pre_logits=True).shape == (2, 256)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert any(n.endswith("ghost_add") for n in model.no_weight_decay())
    features = timm.create_model("elsa_swin_nano", features_only=True, out_indices=(1, 3), img_size=64)
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels() == [64, 256]


# ---- training runs ----------------------------------------------------------------------------
@pytest.mark.slow
def test_train_lowers_loss_then_resume_then_validate(tmp_path):
    data = write_digits(tmp_path / "digits")
    out = tmp_path / "out"
    r = run(
        [
            "train.py",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "2",
            "--output",
            str(out),
            "--experiment",
            "run",
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--checkpoint-hist",
            "1",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "run"
    rows = read_summary(run_dir / "summary.csv")
    assert len(rows) == 2 and float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "last.pth.tar").exists()
    assert len(list(run_dir.glob("checkpoint-*.pth.tar"))) == 1  # --checkpoint-hist 1

    r = run(
        [
            "train.py",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "3",
            "--output",
            str(out),
            "--experiment",
            "run",
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--resume",
            str(run_dir / "last.pth.tar"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_summary(run_dir / "summary.csv")
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]

    # The resumed epoch follows the schedule of an uninterrupted 3-epoch run (the first two epochs above
    # were scheduled for 2 epochs, so only the resumed one is comparable).
    r = run(
        [
            "train.py",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "3",
            "--output",
            str(out),
            "--experiment",
            "straight",
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--channels-last",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    straight = read_summary(out / "straight" / "summary.csv")
    assert float(straight[2]["lr"]) == float(rows[2]["lr"])

    results = tmp_path / "results.json"
    r = run(
        [
            "validate.py",
            str(data),
            "--model",
            "elsa_swin_nano",
            "--img-size",
            "32",
            "-j",
            "0",
            "--checkpoint",
            str(run_dir / "last.pth.tar"),
            "--no-test-pool",
            "--apex-amp",
            "--use-ema",
            "--results-file",
            str(results),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(results.read_text())
    assert metrics["images"] == 40 and metrics["top1"] > 40  # four classes: chance is 25%
    assert "native torch.amp" in r.stderr

    # prediction and the attention picture, with the class names train.py stored
    digit = sorted((data / "val" / "2").glob("*.png"))[0]
    r = run(
        [
            "predict.py",
            str(digit),
            str(digit),
            "--model",
            "elsa_swin_nano",
            "--img-size",
            "32",
            "--checkpoint",
            str(run_dir / "model_best.pth.tar"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == str(digit) and len(lines) == 2 * (1 + 4)  # four classes: top-4
    probs = [float(line.split("%")[0]) for line in lines[1:5]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 100) < 0.1
    assert {line.split("%")[1].strip() for line in lines[1:5]} == {"0", "1", "2", "3"}
    png = tmp_path / "attention.png"
    r = run(
        [
            "visualize.py",
            str(digit),
            "--model",
            "elsa_swin_nano",
            "--img-size",
            "32",
            "--checkpoint",
            str(run_dir / "model_best.pth.tar"),
            "-o",
            str(png),
            "--pixels",
            "2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(png) as picture:
        # three ELSA stages of (2 pixels + ghost kernels) rows, 1 + 4 heads columns at 1.6 in, 90 dpi
        assert picture.size == (int(1.6 * 5 * 90), int(1.6 * 9 * 90))
    best = str(run_dir / "model_best.pth.tar")
    error = tool_error("predict", [str(tmp_path / "none.png"), "--model", "elsa_swin_nano", "--checkpoint", best])
    assert "none.png: cannot be read" in error
    error = tool_error("visualize", [str(digit), "--model", "elsa_swin_tiny", "--checkpoint", best])
    assert "does not fit elsa_swin_tiny" in error


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    data = write_digits(tmp_path / "digits", per_class=8, val_per_class=4)
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            "bash",
            "distributed_train.sh",
            "2",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "1",
            "--output",
            str(tmp_path / "out"),
            "--experiment",
            "ddp",
            "--device",
            "cpu",
            # with autocast, as the original's command trains: its gradients are the ones whose
            # layout once differed from the parameters' and made DDP warn on every rank
            "--amp",
        ],
        cwd=CLS,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_summary(tmp_path / "out" / "ddp" / "summary.csv")
    assert len(rows) == 1
    assert "distributed: 2 processes, backend gloo" in r.stderr
    assert "Grad strides do not match" not in r.stderr


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("no_val", "val is missing"),
        ("empty_class", "class folders without images"),
        ("no_root", "does not exist"),
    ],
)
def test_bad_data_is_reported(tmp_path, breakage, message):
    data = tmp_path / "d"
    for split in ("train", "val"):
        folder = data / split / "a"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(folder / "x.png")
    if breakage == "no_val":
        import shutil

        shutil.rmtree(data / "val")
    elif breakage == "empty_class":
        (data / "train" / "b").mkdir()
    else:
        data = tmp_path / "missing"
    assert message in tool_error("train", [str(data), *TRAIN_ARGS, "--epochs", "1", "--output", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "option,message",
    [
        (["--size", "0"], "error: --size must be at least 1, got 0"),
        (["--val-fraction", "1"], "error: --val-fraction must be in [0, 1), got 1.0"),
    ],
)
def test_make_digits_refuses_bad_options(tmp_path, option, message):
    assert tool_error("digits", [str(tmp_path / "digits"), *option]) == message
    assert not (tmp_path / "digits").exists()


@pytest.mark.slow
def test_torchcompile_and_unreadable_image(tmp_path):
    data = write_digits(tmp_path / "digits", per_class=4, val_per_class=2)
    (data / "train" / "0" / "broken.png").write_bytes(b"not an image")
    r = run(
        [
            "train.py",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "1",
            "--output",
            str(tmp_path / "o"),
            "--experiment",
            "compiled",
            "--torchcompile",
            "aot_eager",
            "--grad-checkpointing",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "broken.png" in r.stderr  # skipped, and named
    assert len(read_summary(tmp_path / "o" / "compiled" / "summary.csv")) == 1


def test_torch_compile_whole_model_inductor():
    """A whole ELSA-Swin, forward and backward, compiles into one graph with the default backend."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_nano", num_classes=4, img_size=32, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)


def test_behaves_like_every_timm_model():
    """device= / dtype=, in_chans, the meta device, reset_classifier, FX feature extraction (timm's and
    torchvision's) and TorchScript, as timm's own Swin."""
    from timm.models import FeatureGraphNet
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_nano", img_size=64, device="cpu", dtype=torch.float64).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64} and model.in_chans == 3
    model.reset_classifier(5)
    assert model.head.fc.weight.dtype == torch.float64 and model.head.fc.out_features == 5
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        _, feats = model.forward_intermediates(x)
        fx = FeatureGraphNet(model, out_indices=(0, 1, 2, 3)).eval()  # what feature_cls="fx" builds
        for got, want in zip(fx(x), feats, strict=True):
            torch.testing.assert_close(got.permute(0, 3, 1, 2), want)
        tv = create_feature_extractor(model, return_nodes=["layers.1", "layers.3"])
        torch.testing.assert_close(tv(x)["layers.3"].permute(0, 3, 1, 2), feats[3])
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), logits)
    with torch.device("meta"):
        meta = timm.create_model("elsa_swin_tiny")
        assert meta(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
    features = timm.create_model("elsa_swin_nano", img_size=64, features_only=True, feature_cls="fx")
    assert [f.shape[-1] for f in features(x.float())] == [32, 64, 128, 256]


def test_model_table_runs_and_counts_the_published_sizes():
    r = subprocess.run(
        [sys.executable, str(CLS.parent / "benchmarks" / "model_table.py"), "--no-speed", "--no-dense"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in r.stdout.splitlines() if line.startswith("| ")}
    # parameters as published (29M / 53M / 93M); ELSA adds a little compute to Swin's 4.5 / 8.7 / 15.4 GFLOPs
    for name, params, swin in (
        ("elsa_swin_tiny", "29.14", "swin_tiny_patch4_window7_224"),
        ("elsa_swin_small", "52.87", "swin_small_patch4_window7_224"),
        ("elsa_swin_base", "92.68", "swin_base_patch4_window7_224"),
    ):
        assert rows[name][0].strip() == params
        assert 1.0 < float(rows[name][1]) / float(rows[swin][1]) < 1.1
