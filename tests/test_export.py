"""ONNX: the ELSA op's export decomposition in each form (exact, the memory each holds, every case the op
takes, dynamic batch and image size), tools/export_onnx.py, and plain torch.onnx.export of the classifier
and the dense backbone, checked with onnxruntime."""

import collections
import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from op_cases import GHOSTS, make_inputs
from torch.fx.experimental.proxy_tensor import make_fx

import elsa_swin  # noqa: F401
from elsa_op import elsa_function
from elsa_op.decomposition import FORMS, decomposition_form, elsa_forward_decomposition
from elsa_swin.onnx import main as export_onnx_main

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # README: onnxruntime agrees with PyTorch within this, in float32


DECOMPOSITION_CASES = [
    (2, 6, 7, 9, 3, 3, 2, 2, "broadcast", "nchw"),
    (1, 8, 5, 4, 2, 5, 1, 1, "batched", "channels_last"),
    (2, 4, 9, 9, 1, 7, 3, 3, None, "nchw"),
    (1, 6, 3, 2, 2, 7, 1, 1, "broadcast", "channels_last"),
    (3, 6, 8, 6, 3, 3, 1, 2, "mixed", "nchw"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("B,C,H,W,G,K,dilation,stride,ghost,layout", DECOMPOSITION_CASES)
def test_decomposition_matches_the_kernels(B, C, H, W, G, K, dilation, stride, ghost, layout, form):
    x, h, m, a = make_inputs(B=B, C=C, H=H, W=W, G=G, K=K, stride=stride, ghost=ghost, layout=layout, grad=False)
    h = h if h.dim() == 5 else h.unsqueeze(1)
    got = elsa_forward_decomposition(x, h, m, a, K, dilation, stride, form)
    torch.testing.assert_close(
        got, elsa_function(x, h, m, a, kernel_size=K, dilation=dilation, stride=stride), rtol=1e-12, atol=1e-12
    )


def largest_intermediate(function, *inputs) -> int:
    graph = make_fx(function)(*inputs)
    return max(
        n.meta["val"].numel()
        for n in graph.graph.nodes
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
    )


@pytest.mark.parametrize(
    "B,C,H,W,G,K,dilation,layout,shared_add",
    [
        (2, 6, 7, 9, 3, 3, 2, "nchw", False),  # blocks cut by the image's edge
        (1, 8, 10, 11, 2, 5, 1, "channels_last", True),
        (2, 6, 14, 14, 3, 7, 1, "channels_last", True),  # whole blocks, as in ELSA-Swin
        (1, 4, 15, 8, 1, 7, 3, "nchw", False),
        (3, 4, 4, 3, 2, 1, 1, "nchw", True),  # K = 1: blocks of one pixel
    ],
)
def test_the_blocks_form_is_exact_where_it_applies(B, C, H, W, G, K, dilation, layout, shared_add):
    """Stride 1 with no ghost kernel on the taps (an additive one shared by the batch is a convolution) takes
    the blocks form's own path: its largest intermediate is the blocks' weight matrices, [K * K, S * S] per
    block and group, and it agrees with the kernels."""
    ghost = "broadcast" if shared_add else None
    x, h, _, a = make_inputs(B=B, C=C, H=H, W=W, G=G, K=K, ghost=ghost, layout=layout, grad=False)
    h = h if h.dim() == 5 else h.unsqueeze(1)
    got = elsa_forward_decomposition(x, h, None, a, K, dilation, 1, "blocks")
    want = elsa_function(x, h, None, a, kernel_size=K, dilation=dilation, stride=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    S, blocks = K + (K - 1) * dilation, -(-H // K) * -(-W // K)
    form = functools.partial(elsa_forward_decomposition, kernel_size=K, dilation=dilation, stride=1, form="blocks")
    assert largest_intermediate(lambda *t: form(*t), x, h, None, a) == max(B * G * blocks * K * K * S * S, x.numel())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("ghost", GHOSTS)
def test_the_memory_each_form_holds(ghost, form):
    """The taps form never holds the K * K taps at once: its largest intermediate is the padded features.
    The windows form holds them once: its largest is the K * K windows of every pixel, K * K times the
    features (a ghost kernel per image is weighed with them, in a product of that size too). The blocks form
    holds S * S weights per pixel and group, S = 2 * K - 1 here; with a multiplicative ghost kernel it is
    written as the windows form."""
    B, C, H, W, G, K = 2, 8, 12, 12, 2, 7
    x, h, m, a = make_inputs(B=B, C=C, H=H, W=W, G=G, K=K, ghost=ghost, dtype=torch.float32, grad=False)
    h = h.reshape(B, G, K * K, H, W)
    largest = largest_intermediate(lambda *t: elsa_forward_decomposition(*t, K, 1, 1, form), x, h, m, a)
    expected = {
        "taps": B * C * (H + K - 1) * (W + K - 1),
        "windows": K * K * B * C * H * W,
        "blocks": B * G * 4 * K * K * (2 * K - 1) ** 2 if ghost is None else K * K * B * C * H * W,
    }[form]
    assert largest == expected


def test_the_form_is_checked():
    x, h, m, a = make_inputs(B=1, C=4, H=5, W=5, G=2, K=3, ghost=None, grad=False)
    with pytest.raises(ValueError, match="form must be one of"):
        elsa_forward_decomposition(x, h, m, a, 3, 1, 1, "unfold")
    with pytest.raises(ValueError, match="form must be one of"), decomposition_form("unfold"):
        pass


class OpModule(torch.nn.Module):
    """The op between layers that make its inputs from the image, so that one dynamic batch and image size
    drive every input of the op (the attention is [B, G, K*K, Ho, Wo] with Ho = (H - 1) // stride + 1)."""

    def __init__(self, C: int, G: int, K: int, dilation: int, stride: int, ghost: str | None, channels_last: bool):
        super().__init__()
        self.K, self.G, self.dilation, self.stride, self.channels_last = K, G, dilation, stride, channels_last
        self.values = torch.nn.Conv2d(3, C, 3, padding=1)
        self.logits = torch.nn.Conv2d(3, G * K * K, 1, stride=stride)
        shared = torch.nn.Parameter(torch.randn(C, K, K) * 0.5)
        self.ghost = ghost
        self.shared = shared if ghost in ("broadcast", "mixed", "add") else None
        self.per_image = torch.nn.Linear(3, C * K * K) if ghost in ("batched", "mixed") else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        B, K = image.shape[0], self.K
        v = self.values(image)
        if self.channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        logits = self.logits(image)
        h = logits.reshape(B, self.G, K * K, logits.shape[2], logits.shape[3]).softmax(2)
        per_image = None
        if self.per_image is not None:  # a [B, C, K, K] kernel made from each image's mean colour
            per_image = self.per_image(image.mean((2, 3))).reshape(B, -1, K, K)
        mul = {"broadcast": self.shared, "batched": per_image, "mixed": self.shared}.get(self.ghost)
        add = {"broadcast": self.shared, "batched": per_image, "mixed": per_image, "add": self.shared}.get(self.ghost)
        return elsa_function(v, h, mul, add, kernel_size=K, dilation=self.dilation, stride=self.stride)


def op_types(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    "G,K,dilation,stride,ghost,channels_last,form",
    [
        (2, 3, 1, 1, "broadcast", True, "windows"),
        (1, 5, 2, 1, "batched", False, "windows"),
        (4, 3, 1, 2, "mixed", False, "windows"),
        (2, 7, 1, 1, None, True, "windows"),
        (1, 3, 3, 3, "broadcast", False, "windows"),
        (4, 3, 2, 2, "mixed", True, "taps"),
        (2, 3, 2, 1, "add", False, "blocks"),  # a dynamic size: written as the windows form
    ],
)
def test_the_op_exports_with_dynamic_batch_and_size(tmp_path, G, K, dilation, stride, ghost, channels_last, form):
    torch.manual_seed(0)
    module = OpModule(8, G, K, dilation, stride, ghost, channels_last).eval()
    batch, height, width = torch.export.Dim("batch", min=1), torch.export.Dim.AUTO, torch.export.Dim.AUTO
    with decomposition_form(form):
        program = torch.onnx.export(
            module, (torch.randn(2, 3, 11, 13),), dynamo=True, dynamic_shapes=({0: batch, 2: height, 3: width},)
        )
    program.save(str(tmp_path / "op.onnx"))
    ops = op_types(tmp_path / "op.onnx")
    # windows (and blocks at a dynamic size): the K * K taps are one Gather and one MatMul; taps: one Slice
    # of the features per tap
    assert (ops["Gather"] == 1 and ops["MatMul"] == 1) if form != "taps" else ops["Slice"] >= K * K
    session = onnxruntime.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 9, 16), (1, 3, 5, 4)]:
        image = torch.randn(shape)
        got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
        with torch.no_grad():
            want = module(image)
        assert got.shape == tuple(want.shape)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("ghost", [None, "add"])
def test_the_blocks_form_takes_a_fixed_image_size_and_a_dynamic_batch(tmp_path, ghost):
    """At a size fixed at export, the blocks form's own path: two Gathers (the patches and the weights) and
    one MatMul, in onnxruntime at any batch, with the image cut by the blocks' edge (11 x 13, K = 5). At a
    size left dynamic, even with bounds given (Dim), the export succeeds and runs at sizes that are and are
    not multiples of K: the op is written in the windows form, one Gather."""
    torch.manual_seed(0)
    module = OpModule(8, 2, 5, 1, 1, ghost, True).eval()
    batch = torch.export.Dim("batch", min=1)
    fixed = torch.onnx.export(module, (torch.randn(2, 3, 11, 13),), dynamo=True, dynamic_shapes=({0: batch},))
    fixed.save(str(tmp_path / "fixed.onnx"))
    size = {0: batch, 2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}
    dynamic = torch.onnx.export(module, (torch.randn(2, 3, 11, 13),), dynamo=True, dynamic_shapes=(size,))
    dynamic.save(str(tmp_path / "dynamic.onnx"))
    for name, gathers, shapes in [
        ("fixed", 2, [(3, 3, 11, 13), (1, 3, 11, 13)]),
        ("dynamic", 1, [(3, 3, 10, 15), (1, 3, 11, 13), (2, 3, 2, 3)]),
    ]:
        ops = op_types(tmp_path / f"{name}.onnx")
        assert ops["Gather"] == gathers and ops["MatMul"] == 1, (name, ops)
        session = onnxruntime.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for shape in shapes:
            image = torch.randn(shape)
            got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(got), module(image), rtol=0, atol=ATOL)


@pytest.mark.parametrize("ghost", ["mixed", "add"])  # the windows form, the blocks form
def test_an_exported_program_keeps_the_op_until_decomposed(ghost):
    """torch.export keeps the op (AOTInductor calls the kernels); the table of elsa_op.decomposition takes it
    out of a program for exporters that were handed the program rather than the model."""
    from elsa_op.decomposition import decompositions

    torch.manual_seed(0)
    module = OpModule(8, 2, 3, 1, 1, ghost, False).eval()
    image = torch.randn(2, 3, 7, 9)
    program = torch.export.export(module, (image,))
    op = torch.ops.elsa_op.elsa_forward.default
    assert [n.target for n in program.graph.nodes].count(op) == 1
    table = torch.export.default_decompositions()
    table.update(decompositions())
    decomposed = program.run_decompositions(table)
    assert op not in [n.target for n in decomposed.graph.nodes]
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(image), module(image), rtol=1e-5, atol=1e-5)


def test_plain_export_of_the_classifier(tmp_path):
    """torch.onnx.export(model, x, dynamo=True) as a user writes it, with a dynamic batch and image size
    (every stage ELSA, one block each: the smallest classifier that holds all its kinds of layer)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "elsa_swin_nano", num_classes=5, depths=(1, 1, 1, 1), elsa_stages=(True, True, True, True)
    ).eval()
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), dynamo=True, dynamic_shapes=(dims,))
    program.save(str(tmp_path / "nano.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "nano.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 64, 64), (1, 3, 96, 80)]:
        x = torch.randn(shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=0, atol=ATOL)


def test_export_tool(tmp_path, capsys):
    out = tmp_path / "nano.onnx"
    args = ["--model", "elsa_swin_nano", "--img-size", "64", "--num-classes", "7", "-o", str(out)]
    assert export_onnx_main(args) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max abs difference (\S+)", printed).group(1))
    assert diff <= ATOL and out.stat().st_size > 0
    # the time and the nodes by type; each of the 6 ELSA layers is two Gathers (the blocks' patches and
    # weights) and one MatMul (the taps form wrote 2 * 49 Slices per layer)
    total = int(re.search(r"exported elsa_swin_nano in [0-9.]+ s \(blocks form\): (\d+) nodes", printed).group(1))
    counts = {op: int(n) for op, n in re.findall(r"(\w+) (\d+)", printed.split("nodes by type: ")[1].splitlines()[0])}
    assert sum(counts.values()) == total == sum(op_types(out).values())
    assert counts.get("Slice", 0) < 49 and counts["Gather"] >= 12
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": torch.randn(5, 3, 64, 64).numpy()})[0].shape == (5, 7)  # dynamic batch


def test_export_tool_refuses_an_unknown_model(tmp_path, capsys):
    assert export_onnx_main(["--model", "no_such_model", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_plain_export_of_the_dense_backbone(tmp_path):
    pytest.importorskip("mmengine")
    from elsa_mm import ELSASwin

    torch.manual_seed(0)
    # Two stages (an ELSA block, then two attention blocks, shifted and not) hold every kind of layer the
    # backbone has. Each further
    # stage nests the symbolic sizes of its window padding deeper: the exporter's simplification of them
    # took 11 minutes for four stages on a 2-core machine, 2 for these two.
    backbone = ELSASwin(embed_dim=32, depths=(1, 2), num_heads=(1, 2), group_width=4, out_indices=(0, 1)).eval()
    x = torch.randn(2, 3, 64, 96)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.onnx.export(backbone, (x,), dynamo=True, dynamic_shapes=(dims,))
    program.save(str(tmp_path / "backbone.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 64, 96), (1, 3, 75, 50)]:  # another batch and another image size, not whole windows
        x3 = torch.randn(shape)
        got = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
        with torch.no_grad():
            want = backbone(x3)
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_aoti_package_calls_the_kernels_and_matches_eager(tmp_path, monkeypatch):
    """AOTInductor: the package keeps each ELSA layer as a call into elsa_op (no decomposition), takes any
    batch and matches eager PyTorch."""
    # Inductor refuses to fall back to the kernel of an op that has a registered decomposition when CI is set.
    monkeypatch.setenv("CI", "1")
    from elsa_swin.aoti import count_elsa_calls, export_program, load_package, package, package_elsa_calls

    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_nano", img_size=64, num_classes=7).eval()
    program = export_program(model, torch.randn(2, 3, 64, 64))
    layers = sum(isinstance(m, elsa_swin.ELSABlock) for m in model.modules())
    assert count_elsa_calls(program) == layers == 6
    path = package(program, tmp_path / "nano.pt2")
    assert package_elsa_calls(path) == layers
    compiled = load_package(path)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=ATOL)


def test_aoti_tool_refuses_bad_arguments(tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "export_aoti.py")]
    r = subprocess.run([*tool, "-o", str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "must end in .pt2" in r.stderr
    r = subprocess.run(
        [*tool, "--checkpoint", str(tmp_path / "none.pth"), "-o", str(tmp_path / "x.pt2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "does not exist" in r.stderr and not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("elsa_stages", [None, (True, False, True, False)])
def test_aoti_dense_backbone_takes_the_classifiers_architecture_and_weights(elsa_stages):
    """--dense packages the dense backbone of the classifier's own architecture (ELSA stages included) with
    the classifier's weights."""
    pytest.importorskip("mmengine")
    from elsa_swin.aoti import _dense_backbone

    torch.manual_seed(0)
    extra = {} if elsa_stages is None else dict(elsa_stages=elsa_stages)
    # 224 px: at every stage the Swin windows keep their size (a smaller image shrinks the last ones)
    model = timm.create_model("elsa_swin_nano", img_size=224, num_classes=7, **extra).eval()
    backbone = _dense_backbone(model).eval()
    theirs = backbone.state_dict()
    shared = [k for k, v in model.state_dict().items() if not k.startswith(("head.", "norm."))]
    assert shared and all(torch.equal(theirs[k], model.state_dict()[k]) for k in shared)
    layers = sum(isinstance(m, elsa_swin.ELSABlock) for m in model.modules())
    assert sum(isinstance(m, elsa_swin.ELSABlock) for m in backbone.modules()) == layers
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 224, 224))
    assert [f.shape[1] for f in feats] == [model.embed_dim * 2**i for i in range(4)]


def test_the_deployment_benchmark_shuffles_its_runners_and_pairs_rounds():
    """bench_deploy.py's figures: every round calls the runners in a new order, the same from run to run (so
    that no runner always follows the same one's spinning threads), and a ratio is the median of the
    rounds' ratios, with their range."""
    spec = importlib.util.spec_from_file_location("bench_deploy", REPO / "benchmarks" / "bench_deploy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls: list[str] = []
    runners = {key: functools.partial(calls.append, key) for key in "abcd"}
    times = bench.time_interleaved(runners, rounds=8, warmup=1)
    assert {key: len(seconds) for key, seconds in times.items()} == dict.fromkeys("abcd", 8)
    assert calls[:4] == list("abcd")  # the warm-up
    rounds = ["".join(calls[i : i + 4]) for i in range(4, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    for key in "abcd":  # what ran just before each runner's call
        assert len({r[r.index(key) - 1] if r.index(key) else None for r in rounds}) >= 3, (key, rounds)
    calls.clear()
    bench.time_interleaved(runners, rounds=8, warmup=1)
    assert ["".join(calls[i : i + 4]) for i in range(4, len(calls), 4)] == rounds
    assert bench.speedup([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == "3.00x (2.00-4.00)"
