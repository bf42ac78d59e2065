"""ONNX: the ELSA op's export decomposition, tools/export_onnx.py, and plain torch.onnx.export of the
dense backbone, checked with onnxruntime."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_op import make_inputs

from elsa_op import elsa_function
from elsa_op.decomposition import elsa_forward_decomposition

onnxruntime = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # README: onnxruntime agrees with PyTorch within this, in float32


@pytest.mark.parametrize(
    "B,C,H,W,G,K,dilation,stride,ghost",
    [
        (2, 6, 7, 9, 3, 3, 2, 2, "broadcast"),
        (1, 8, 5, 4, 2, 5, 1, 1, "batched"),
        (2, 4, 9, 9, 1, 7, 3, 3, None),
        (1, 6, 3, 2, 2, 7, 1, 1, "broadcast"),
    ],
)
def test_decomposition_matches_the_kernels(B, C, H, W, G, K, dilation, stride, ghost):
    x, h, m, a = make_inputs(B=B, C=C, H=H, W=W, G=G, K=K, stride=stride, ghost=ghost, grad=False)
    h = h if h.dim() == 5 else h.unsqueeze(1)
    got = elsa_forward_decomposition(x, h, m, a, K, dilation, stride)
    torch.testing.assert_close(
        got, elsa_function(x, h, m, a, kernel_size=K, dilation=dilation, stride=stride), rtol=1e-12, atol=1e-12
    )


def test_export_tool(tmp_path):
    out = tmp_path / "nano.onnx"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_onnx.py"),
            "--model",
            "elsa_swin_nano",
            "--img-size",
            "64",
            "--num-classes",
            "7",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    diff = float(re.search(r"max abs difference (\S+)", r.stdout).group(1))
    assert diff <= ATOL and out.stat().st_size > 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": torch.randn(5, 3, 64, 64).numpy()})[0].shape == (5, 7)  # dynamic batch


def test_plain_export_of_the_dense_backbone(tmp_path):
    pytest.importorskip("mmengine")
    from elsa_mm import ELSASwin

    torch.manual_seed(0)
    backbone = ELSASwin(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4).eval()
    x = torch.randn(2, 3, 64, 96)
    program = torch.onnx.export(backbone, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "backbone.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 64, 96)
    got = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        want = backbone(x3)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL)
