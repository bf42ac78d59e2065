"""elsa_op on every device: parity with the original, gradcheck against the reference, channels-last memory, low
precision and autocast, determinism, opcheck, torch.compile and bad input; on a GPU also every op against the CPU
operator and indices past 2^31. The CPU runs always; the `cuda` parameters need a GPU (conftest.py skips them
without one), and tests/test_cuda_emulation.py checks the CUDA kernels' maths on the CPU."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import (
    CL_CASES,
    GEOMETRIES,
    GHOSTS,
    LAYOUTS,
    assert_close_scaled,
    channels_last,
    geometry_id,
    make_inputs,
)
from torch.utils._python_dispatch import TorchDispatchMode

from elsa_op import ELSAAttention, elsa_function, elsa_reference

ops = torch.ops.elsa_op

GPU = pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), GPU])
def device(request) -> str:
    """Every device the op has kernels for."""
    return request.param


@pytest.fixture(params=[GPU])
def gpu(request) -> str:
    """For what only a GPU has: a second device, its autocast, memory past 2^31 elements."""
    return request.param


def _on(t, device):
    return t.to(device) if t is not None else None


class _RecordOps(TorchDispatchMode):
    """Records the arguments of every elsa_op operator that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "elsa_op":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


def _all_ops(x, h, go, m, a, K, d, s, device):
    """Every op, every subset of the attention/ghost gradients, on `device`; results in call order."""
    x, h, go, m, a = (_on(t, device) for t in (x, h, go, m, a))
    G = h.shape[1]
    results = [
        ops.elsa_forward(x, h, m, a, K, d, s),
        ops.elsa_backward_features(go, h, m, a, x.shape[2], x.shape[3], K, d, s),
    ]
    mb, ab = m is not None and m.dim() == 4, a is not None and a.dim() == 4
    for need in itertools.product((False, True), repeat=3):
        results += ops.elsa_backward_attn_ghost(
            go, x, h, m, G, K, d, s, need[0], need[1] and m is not None, need[2] and a is not None, mb, ab
        )
    return results


# ---- parity with the original implementation -------------------------------------------------
@pytest.mark.parametrize("case", range(5))
def test_parity_with_original(device, data_dir, case):
    c = torch.load(data_dir / "elsa_op_cases.pt", weights_only=True)[case]
    K, d, lam, gamma = (c["args"][k] for k in ("kernel_size", "dilation", "lam", "gamma"))
    x = c["features"].to(device).requires_grad_()
    h = c["h_attn"].to(device).requires_grad_()
    mul = c["ghost_mul"].to(device).requires_grad_()
    add = c["ghost_add"].to(device).requires_grad_()
    # lam/gamma belong to the layer: m = ghost_mul ** lam, a = ghost_add * gamma.
    m = mul**lam if lam != 0 else None
    a = add * gamma if gamma != 0 else None
    out = elsa_function(x, h, m, a, kernel_size=K, dilation=d)
    torch.testing.assert_close(out, c["out"].to(device), rtol=1e-10, atol=1e-10)
    inputs = {"grad_features": x, "grad_h_attn": h, "grad_ghost_mul": mul, "grad_ghost_add": add}
    wanted = {k: v for k, v in inputs.items() if c[k] is not None}
    grads = torch.autograd.grad(out, list(wanted.values()), c["grad_out"].to(device))
    for name, grad in zip(wanted, grads, strict=True):
        torch.testing.assert_close(grad, c[name].to(device), rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ghost", GHOSTS)
@pytest.mark.parametrize(
    "case",
    GEOMETRIES
    + [
        (1, 12, 7, 8, 2, 3, 1, 1),  # heads of 6 channels: scalar loads
        (1, 64, 9, 8, 1, 13, 1, 1),  # a head split into chunks
        (1, 16, 6, 5, 2, 15, 1, 1),  # runtime K
    ],
    ids=geometry_id,
)
def test_matches_the_cpu_operator_float64(gpu, case, ghost, layout):
    """Same values, same shapes and the same strides (the layout of each result) as the CPU operator."""
    B, C, H, W, G, K, d, s = case
    x, h, m, a, go = make_inputs(B, C, H, W, G, K, s, ghost, layout=layout, grad=False, seed=0, grad_out=True)
    want = _all_ops(x, h, go, m, a, K, d, s, "cpu")
    got = _all_ops(x, h, go, m, a, K, d, s, gpu)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, k
        assert g.stride() == w.stride() or g.numel() <= 1, (k, g.stride(), w.stride())
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10, msg=lambda msg, k=k: f"result {k}: {msg}")


# ---- gradcheck in float64 --------------------------------------------------------------------
GRID = list(itertools.product([1, 3, 5, 7, 9], [1, 2, 3], [1, 2]))


@pytest.mark.parametrize("K,dilation,stride", GRID)
def test_gradcheck_grid(device, K, dilation, stride):
    x, h, m, a = make_inputs(B=2, C=6, H=6, W=5, G=3, K=K, stride=stride, device=device)
    fn = lambda *t: elsa_function(*t, kernel_size=K, dilation=dilation, stride=stride)  # noqa: E731
    # Off the CPU, gradcheck's fast mode (random projections of the Jacobian): the full one launches kernels
    # once per input element, about a minute on a GPU for the grid, and the GPU's gradients are compared
    # element by element with the CPU's in test_matches_the_cpu_operator_float64.
    assert torch.autograd.gradcheck(fn, (x, h, m, a), eps=1e-6, atol=1e-7, fast_mode=device != "cpu")
    torch.testing.assert_close(
        fn(x, h, m, a), elsa_reference(x, h, m, a, kernel_size=K, dilation=dilation, stride=stride)
    )


@pytest.mark.parametrize(
    "shape,G,ghost",
    [
        ((2, 4, 5, 8), 1, "batched"),  # non-square, per-batch ghost kernels, 4-D h_attn
        ((1, 3, 2, 3), 3, "broadcast"),  # image smaller than the kernel
        ((3, 6, 4, 4), 3, None),  # no ghost kernels
        ((2, 6, 9, 3), 2, "batched"),
    ],
)
@pytest.mark.parametrize("K,stride", [(5, 1), (7, 2)])
def test_gradcheck_shapes(device, shape, G, ghost, K, stride):
    B, C, H, W = shape
    x, h, m, a = make_inputs(B, C, H, W, G, K, stride, ghost, device=device, attn_4d=G == 1)
    assert h.dim() == (4 if G == 1 else 5)
    fn = lambda *t: elsa_function(*t, kernel_size=K, dilation=2, stride=stride)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h, m, a), eps=1e-6, atol=1e-7)


def test_mixed_ghost_batching_and_partial_grads(device):
    x, h, m, a = make_inputs(ghost="mixed", device=device)
    assert m.dim() == 3 and a.dim() == 4
    x.requires_grad_(False)
    m.requires_grad_(False)
    kw = dict(kernel_size=3, dilation=2)
    out = elsa_function(x, h, m, a, **kw)
    ref = elsa_reference(x, h, m, a, **kw)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, a), go)
    want = torch.autograd.grad(ref, (h, a), go)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2)


def test_non_contiguous_inputs(device):
    x, h, m, a = make_inputs(B=2, C=6, H=8, W=8, G=3, K=3, grad=False, device=device)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided
    ht = h[..., ::1].permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    mt = m.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous() and not ht.is_contiguous() and not mt.is_contiguous()
    torch.testing.assert_close(elsa_function(xt, ht, mt, a, kernel_size=3), elsa_function(x, h, m, a, kernel_size=3))
    big = torch.randn(2, 12, 8, 8, dtype=torch.float64, device=device)[:, ::2]  # channel-strided slice
    torch.testing.assert_close(elsa_function(big, h, m, a, kernel_size=3), elsa_reference(big, h, m, a, kernel_size=3))


# ---- low precision and autocast ----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(device, dtype, tol):
    """Every input in the low-precision dtype, the ghost kernels too."""
    x, h, m, a = make_inputs(B=2, C=8, H=10, W=12, G=2, K=5, dtype=torch.float64, grad=False, device=device)
    h = h.softmax(2)
    ref = elsa_reference(x, h, m, a, kernel_size=5)
    cast = [t.to(dtype).requires_grad_() for t in (x, h, m, a)]
    out = elsa_function(*cast, kernel_size=5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol * 10, atol=tol * 10)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in cast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES[1:6], ids=geometry_id)
def test_low_precision_matches_the_reference(device, case, dtype):
    """Half and bfloat16 features with float32 ghost kernels, accumulated in float32."""
    B, C, H, W, G, K, d, s = case
    x, h, m, a, go = make_inputs(B, C, H, W, G, K, s, "broadcast", dtype, grad=False, seed=0, grad_out=True)
    leaves = [t.double().requires_grad_() for t in (x, h, m, a)]
    ref = elsa_reference(*leaves, kernel_size=K, dilation=d, stride=s)
    want = torch.autograd.grad(ref, leaves, go.double())
    xl, hl = channels_last(x, h)
    dev = [t.detach().to(device).requires_grad_() for t in (xl, hl, m, a)]
    out = elsa_function(*dev, kernel_size=K, dilation=d, stride=s)
    got = torch.autograd.grad(out, dev, go.to(device).contiguous(memory_format=torch.channels_last))
    tol = torch.float32 if dtype == torch.float32 else torch.bfloat16  # (half: bfloat16's looser tolerance)
    assert_close_scaled(out.cpu(), ref.detach(), tol, "forward")
    for g, w, name in zip(got, want, ("features", "attention", "ghost_mul", "ghost_add"), strict=True):
        ghost = name.startswith("ghost")
        assert g.dtype == (torch.float32 if ghost else dtype)
        assert_close_scaled(g.cpu(), w, torch.float32 if ghost and dtype != torch.float32 else tol, name)


def test_autocast_casts_like_a_convolution_and_keeps_ghost_kernels_float32(device):
    """Features and attention go to the autocast dtype, the ghost kernels to float32, and the ghost gradients
    are accumulated and returned in float32."""
    x, h, m, a = make_inputs(dtype=torch.float32, grad=False, device=device)
    m.requires_grad_()
    a.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16), _RecordOps() as mode:
        out = elsa_function(x, h.double(), m.double(), a, kernel_size=3)  # mixed dtypes are unified
    assert out.dtype == torch.bfloat16
    ((name, args),) = mode.calls
    assert [t.dtype for t in args[:4]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(out.float(), elsa_function(x, h, m, a, kernel_size=3), rtol=5e-2, atol=5e-2)
    gm, ga = torch.autograd.grad(out.float().sum(), (m, a))
    want = torch.autograd.grad(elsa_reference(x, h, m, a, kernel_size=3).sum(), (m, a))
    for got, ref in zip((gm, ga), want, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_under_cuda_autocast_keeps_ghost_kernels_float32(gpu, dtype):
    """Under CUDA autocast the features and attention run in half/bfloat16, the ghost kernels and their
    gradients stay float32; the layer's results follow its float32 self within half-precision tolerance."""
    torch.manual_seed(0)
    layer = ELSAAttention(dim=64, num_heads=2, kernel_size=7, group_width=8, lam=1.0, gamma=1.0).to(gpu)
    x = torch.randn(2, 14, 14, 64, device=gpu)
    want = layer(x)
    want_grads = torch.autograd.grad(want.square().sum(), [layer.ghost_mul, layer.ghost_add])
    with torch.autocast(gpu, dtype=dtype), _RecordOps() as mode:
        out = layer(x)
    assert out.dtype == dtype
    name, args = mode.calls[0]
    dtypes = [t.dtype for t in args if isinstance(t, torch.Tensor)]
    assert name == "elsa_forward.default" and dtypes == [dtype, dtype, torch.float32, torch.float32], mode.calls[0]
    grads = torch.autograd.grad(out.float().square().sum(), [layer.ghost_mul, layer.ghost_add])
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_scaled(g, w, torch.bfloat16, "ghost grad under autocast")


def test_half_features_take_float32_ghost_kernels(device):
    """bfloat16 features with float32 ghost kernels (what autocast hands over), and nothing else mixed."""
    x, h, m, a = make_inputs(dtype=torch.float32, grad=False, device=device)
    out = elsa_function(x.bfloat16(), h.bfloat16(), m, a, kernel_size=3)
    assert out.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="ghost_mul has dtype torch.float64 but features have torch.bfloat16"):
        elsa_function(x.bfloat16(), h.bfloat16(), m.double(), a, kernel_size=3)
    with pytest.raises(TypeError, match="ghost_add has dtype torch.float32 but features have torch.float64"):
        elsa_function(x.double(), h.double(), m.double(), a, kernel_size=3)


# ---- determinism ---------------------------------------------------------------------------------
def test_backward_is_deterministic(device):
    x, h, m, a = make_inputs(B=4, C=12, H=14, W=14, G=3, K=7, device=device)
    grads = []
    for _ in range(2):
        out = elsa_function(x, h, m, a, kernel_size=7)
        grads.append(torch.autograd.grad(out, (x, h, m, a), torch.ones_like(out)))
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reruns_are_bit_identical(device, dtype, layout):
    """No atomics: the same inputs give the same bits, forward and backward, every op."""
    x, h, m, a, go = make_inputs(4, 96, 28, 28, 3, 7, 1, "broadcast", dtype, layout=layout, grad=False, grad_out=True)
    first = _all_ops(x, h, go, m, a, 7, 1, 1, device)
    second = _all_ops(x, h, go, m, a, 7, 1, 1, device)
    for k, (t1, t2) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(t1, t2), k


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_results_do_not_depend_on_thread_count(layout):
    x, h, m, a = make_inputs(B=3, C=24, H=13, W=12, G=3, K=7, dtype=torch.float32)
    if layout == "channels_last":
        x, h = channels_last(x, h)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = elsa_function(x, h, m, a, kernel_size=7)
            results.append((out, *torch.autograd.grad(out, (x, h, m, a), torch.ones_like(out))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for t1, t2 in zip(results[0], other, strict=True):
            assert torch.equal(t1, t2)


# ---- channels-last layout -------------------------------------------------------------------
@pytest.mark.parametrize("B,C,H,W,G,K,dilation,stride,ghost", CL_CASES)
def test_channels_last_matches_reference(device, B, C, H, W, G, K, dilation, stride, ghost):
    x, h, m, a = make_inputs(B, C, H, W, G, K, stride, ghost, device=device)
    x_cl, h_cl = channels_last(x, h)
    kw = dict(kernel_size=K, dilation=dilation, stride=stride)
    out = elsa_function(x_cl, h_cl, m, a, **kw)
    ref = elsa_reference(x, h, m, a, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(ref)
    live = [t for t in (m, a) if t is not None]
    got = torch.autograd.grad(out, [x_cl, h_cl, *live], go)
    want = torch.autograd.grad(ref, [x, h, *live], go)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2.view_as(g1), rtol=1e-10, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].permute(0, 3, 4, 1, 2).is_contiguous()  # attention gradient in the attention's layout


@pytest.mark.parametrize(
    "B,C,H,W,G,K,dilation,stride,ghost",
    [
        (2, 6, 7, 6, 3, 3, 1, 1, "broadcast"),
        (2, 6, 7, 6, 3, 5, 2, 2, "batched"),
        (2, 6, 7, 6, 3, 3, 1, 1, None),
        (2, 8, 7, 9, 2, 5, 2, 2, "broadcast"),
    ],
)
def test_channels_last_gradcheck(device, B, C, H, W, G, K, dilation, stride, ghost):
    x, h, m, a = make_inputs(B, C, H, W, G, K, stride, ghost, layout="channels_last", device=device)
    assert x.is_contiguous(memory_format=torch.channels_last) and h.permute(0, 3, 4, 1, 2).is_contiguous()
    fn = lambda *t: elsa_function(*t, kernel_size=K, dilation=dilation, stride=stride)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h, m, a), eps=1e-6, atol=1e-7)


def test_channels_last_slices_are_read_in_place(device):
    """A channel slice of an NHWC projection (how the model passes v) and low precision."""
    x, h, m, a = make_inputs(B=2, C=8, H=9, W=10, G=2, K=5, grad=False, device=device)
    qkv = torch.randn(2, 9, 10, 20, dtype=torch.float64, device=device).permute(0, 3, 1, 2)
    v = qkv[:, 12:]
    assert v.stride(1) == 1 and not v.is_contiguous(memory_format=torch.channels_last)
    h = h.softmax(2)
    _, h_cl = channels_last(x, h)
    ref = elsa_reference(v, h, m, a, kernel_size=5)
    torch.testing.assert_close(elsa_function(v, h_cl, m, a, kernel_size=5), ref)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        out = elsa_function(v.to(dtype), h_cl.to(dtype), m.to(dtype), a.to(dtype), kernel_size=5)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.double(), ref, rtol=tol * 10, atol=tol * 10)


# Run with tests/ as the working directory, so that `python -c` finds op_cases.
_ISA_SCRIPT = """
from elsa_op import elsa_function, elsa_reference  # first, before torch: the package loads what it needs
import torch
from op_cases import CL_CASES, channels_last, make_inputs
worst = 0.0
for B, C, H, W, G, K, d, s, ghost in CL_CASES:
    x, h, m, a = make_inputs(B, C, H, W, G, K, s, ghost)
    x_cl, h_cl = channels_last(x, h)
    out = elsa_function(x_cl, h_cl, m, a, kernel_size=K, dilation=d, stride=s)
    ref = elsa_reference(x, h, m, a, kernel_size=K, dilation=d, stride=s)
    go = torch.randn_like(ref)
    live = [t for t in (m, a) if t is not None]
    for g1, g2 in zip((out, *torch.autograd.grad(out, [x_cl, h_cl, *live], go)), (ref, *torch.autograd.grad(ref, [x, h, *live], go))):
        worst = max(worst, (g1 - g2.view_as(g1)).abs().max().item())
print(torch.ops.elsa_op.cpu_capability(), worst)
"""


def test_channels_last_every_instruction_set():
    """The baseline CPU build (forced by ELSA_CPU_CAPABILITY=default) and the AVX2 build, where the CPU has
    it, both match the reference. (The capability is chosen once per process, hence the processes.)"""
    seen = {}
    for forced in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ELSA_CPU_CAPABILITY"}
        if forced:
            env["ELSA_CPU_CAPABILITY"] = forced
        out = subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        capability, worst = out.stdout.split()
        seen[forced] = capability
        assert float(worst) < 1e-10, (capability, worst)
    assert seen["default"] == "default"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" in flags and " fma" in flags:
        assert seen[None] == "avx2"


def test_layer_hands_the_op_channels_last_memory(device):
    """ELSAAttention passes v and the attention to the op without copies, and its output and gradients
    equal those of the same layer on the reference backend."""
    torch.manual_seed(0)
    layer = ELSAAttention(dim=48, num_heads=2, kernel_size=5, group_width=8, lam=1.0, gamma=1.0).double().to(device)
    x = torch.randn(2, 9, 11, 48, dtype=torch.float64, device=device, requires_grad=True)
    with _RecordOps() as mode:
        out = layer(x)
    ((name, (features, h_attn, *_)),) = mode.calls
    assert name == "elsa_forward.default"
    assert features.stride(1) == 1 and h_attn.permute(0, 3, 4, 1, 2).is_contiguous()
    got = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    layer.backend = "reference"
    with _RecordOps() as mode:
        ref = layer(x)
    assert mode.calls == []
    want = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2)


# ---- torch.library integration ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("ghost,stride", [("broadcast", 1), ("batched", 2), ("mixed", 1), (None, 1)])
def test_opcheck_every_op(device, ghost, stride, layout):
    """opcheck of the forward op (with inputs that need gradients, so that the autograd registration is
    checked too) and of the backward ops, every subset of gradients; the fake kernels give the strides the
    kernels do in both layouts."""
    x, h, m, a, go = make_inputs(2, 12, 7, 9, 3, 3, stride, ghost, layout=layout, device=device, grad_out=True)
    torch.library.opcheck(ops.elsa_forward.default, (x, h, m, a, 3, 2, stride))
    x, h, m, a = (t.detach() if t is not None else None for t in (x, h, m, a))
    torch.library.opcheck(ops.elsa_backward_features.default, (go, h, m, a, 7, 9, 3, 2, stride))
    mb, ab = m is not None and m.dim() == 4, a is not None and a.dim() == 4
    # d/dm needs h_attn, not ghost_mul: asked for without ghost kernels too
    for need_attn, need_mul, need_add in itertools.product((False, True), repeat=3):
        args = (go, x, h, m, 3, 3, 2, stride, need_attn, need_mul, need_add, mb, ab)
        torch.library.opcheck(ops.elsa_backward_attn_ghost.default, args)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_compile_fullgraph_inductor(device, layout, monkeypatch):
    """The default backend (inductor) compiles the op into a whole graph, forward and backward."""
    # With CI set, inductor refuses to call the kernel of an op that has a registered decomposition.
    monkeypatch.setenv("CI", "1")
    torch._dynamo.reset()
    K = 3 if layout == "nchw" else 7
    shape = (2, 6, 7, 9, 3) if layout == "nchw" else (2, 32, 12, 13, 2)
    x, h, m, a = make_inputs(*shape, K, dtype=torch.float32, layout=layout, device=device)

    @torch.compile(fullgraph=True)
    def fn(x, h, m, a):
        return elsa_function(x.relu(), h.softmax(2), m, a, kernel_size=K).sum()

    fn(x, h, m, a).backward()
    got = [t.grad.clone() for t in (x, h, m, a)]
    for t in (x, h, m, a):
        t.grad = None
    elsa_reference(x.relu(), h.softmax(2), m, a, kernel_size=K).sum().backward()
    tol = 1e-5 if device == "cpu" else 1e-4
    for g, t in zip(got, (x, h, m, a), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=tol, atol=tol)


# ---- bad input -------------------------------------------------------------------------------
def _bad(**change):
    x, h, m, a = make_inputs(grad=False, dtype=torch.float32)
    args = dict(features=x, h_attn=h, ghost_mul=m, ghost_add=a, kernel_size=3, dilation=1, stride=1)
    args.update(change)
    return args


# (Checked in Python before any kernel runs, the same for every device.)
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(features=torch.randn(6, 7, 9)), ValueError, "features must be 4-D"),
        (dict(features=torch.randn(2, 6, 0, 9)), ValueError, "features must have channels and pixels"),
        (dict(dilation=2**62), ValueError, "dilation must be at most 2147483647"),
        (dict(stride=2**63 - 1), ValueError, "stride must be at most 2147483647"),
        (dict(kernel_size=2**15 + 1), ValueError, "kernel_size must be at most 32768"),
        (dict(h_attn=torch.randn(2, 3, 9, 7)), ValueError, "h_attn must have shape"),
        (dict(h_attn=torch.randn(2, 9, 7)), ValueError, "h_attn must be"),
        (dict(h_attn=torch.randn(2, 4, 9, 7, 9)), ValueError, "divisible"),
        (dict(h_attn=torch.randn(3, 3, 9, 7, 9)), ValueError, "h_attn must have shape"),
        (dict(ghost_mul=torch.randn(6, 5, 5)), ValueError, "ghost_mul must have shape"),
        (dict(ghost_add=torch.randn(3, 6, 3, 3)), ValueError, "ghost_add must have shape"),
        (dict(kernel_size=4), ValueError, "kernel_size must be odd"),
        (dict(kernel_size=0), ValueError, "kernel_size must be positive"),
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
        (dict(dilation=0), ValueError, "dilation must be positive"),
        (dict(stride=-1), ValueError, "stride must be positive"),
        (dict(ghost_add=torch.randn(6, 3, 3, dtype=torch.float64)), TypeError, "ghost_add has dtype"),
        (dict(features=torch.randint(0, 3, (2, 6, 7, 9))), TypeError, "features must be a floating"),
        (dict(h_attn=torch.randn(2, 3, 9, 7, 9, device="meta")), ValueError, "h_attn is on meta"),
        (dict(h_attn=None), TypeError, "h_attn must be a Tensor"),
    ],
)
def test_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        elsa_function(**_bad(**change))


def test_backward_ops_check_their_arguments(device):
    """The backward ops check dtypes and grad_out's shape as the forward does (devices: the next test)."""
    x, h, m, a = make_inputs(grad=False, stride=2, device=device)
    go = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="h_attn has dtype Float but grad_out has Double"):
        ops.elsa_backward_features(go, h.float(), m, a, 7, 9, 3, 1, 2)
    with pytest.raises(RuntimeError, match="ghost_add has dtype Float but grad_out has Double"):
        ops.elsa_backward_features(go, h, m, a.float(), 7, 9, 3, 1, 2)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 6, 4, 5\] for features of 7x9"):
        ops.elsa_backward_features(go[:, :, :3], h, m, a, 7, 9, 3, 1, 2)
    with pytest.raises(RuntimeError, match="ghost_mul has dtype Float but features has Double"):
        ops.elsa_backward_attn_ghost(go, x, h, m.float(), 3, 3, 1, 2, True, False, False, False, False)
    with pytest.raises(RuntimeError, match="h_attn has dtype Float but features has Double"):
        ops.elsa_backward_attn_ghost(go, x, h.float(), m, 3, 3, 1, 2, False, True, False, False, False)
    with pytest.raises(RuntimeError, match="grad_ghost_mul needs h_attn"):
        ops.elsa_backward_attn_ghost(go, x, None, m, 3, 3, 1, 2, False, True, False, False, False)


def test_ops_refuse_tensors_on_another_device(gpu):
    """A CPU tensor handed to a GPU op is a clear error, in the forward and in every backward op (it would
    fault inside a kernel)."""
    x, h, m, a, go = make_inputs(2, 6, 7, 9, 3, 3, 2, grad=False, device=gpu, grad_out=True)
    with pytest.raises(RuntimeError, match=f"h_attn is on cpu but grad_out on {gpu}"):
        ops.elsa_backward_features(go, h.cpu(), m, a, 7, 9, 3, 1, 2)
    with pytest.raises(RuntimeError, match=f"ghost_mul is on cpu but features on {gpu}"):
        ops.elsa_backward_attn_ghost(go, x, h, m.cpu(), 3, 3, 1, 2, True, False, False, False, False)
    with pytest.raises(RuntimeError, match=f"h_attn is on cpu but features on {gpu}"):
        ops.elsa_backward_attn_ghost(go, x, h.cpu(), m, 3, 3, 1, 2, False, True, False, False, False)
    with pytest.raises(RuntimeError, match=f"h_attn is on {gpu}:0 but features on cpu"):
        ops.elsa_forward(x.cpu(), h, m, a, 3, 1, 2)


def test_double_backward_is_refused(device):
    x, h, m, a = make_inputs(device=device)
    out = elsa_function(x, h, m, a, kernel_size=3)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gx.sum(), h)


@pytest.mark.parametrize("ghost", ["broadcast", "batched", "mixed"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch_gives_empty_results(device, layout, ghost):
    """As nn.Conv2d: a batch of 0 gives an empty output and gradients (zero for broadcast kernels, empty for
    per-image ones)."""
    x, h, m, a = make_inputs(B=0, C=6, H=5, W=4, G=3, K=3, layout=layout, device=device, ghost=ghost)
    out = elsa_function(x, h, m, a, kernel_size=3)
    assert out.shape == (0, 6, 5, 4)
    gx, gh, gm, ga = torch.autograd.grad(out.sum(), (x, h, m, a))
    assert gx.shape == x.shape and gh.shape == h.shape
    assert gm.shape == m.shape and ga.shape == a.shape
    assert torch.equal(gm, torch.zeros_like(gm)) and torch.equal(ga, torch.zeros_like(ga))


def test_dilation_far_beyond_the_image(device):
    """Only the centre tap lands in a 4x4 image at dilation 1200: no padding grows with the dilation."""
    x, h, m, a = make_inputs(B=1, C=4, H=4, W=4, G=2, K=7, grad=False, device=device)
    out = elsa_function(x, h, m, a, kernel_size=7, dilation=1200)
    centre = 24
    weight = h[:, :, centre].repeat_interleave(2, dim=1) * m[:, 3, 3, None, None] + a[:, 3, 3, None, None]
    torch.testing.assert_close(out, x * weight)


def test_meta_tensors():
    x, h, m, a = make_inputs(grad=False, stride=2, device="meta")
    out = elsa_function(x, h, m, a, kernel_size=3, stride=2)
    assert out.device.type == "meta" and out.shape == (2, 6, 4, 5)


def test_indices_past_2_31(gpu):
    """bfloat16 tensors of 2^31 + 2^18 elements: the last image (offsets past 2^31) against the CPU operator."""
    B, C, H, W, G, K = 8193, 64, 64, 64, 1, 7
    if torch.cuda.mem_get_info()[0] < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    dtype = torch.bfloat16
    x, h, m, a, go = make_inputs(
        1, C, H, W, G, K, 1, "batched", dtype, layout="channels_last", grad=False, seed=3, grad_out=True
    )

    def big(t, attn=False):
        shape = (B, H, W, G, K * K) if attn else (B, H, W, C)
        out = torch.empty(shape, dtype=dtype, device=gpu)
        out = out.permute(0, 3, 4, 1, 2) if attn else out.permute(0, 3, 1, 2)
        out[-1:] = t.to(gpu)
        return out

    xb, hb, gob = big(x), big(h, attn=True), big(go)
    mb, ab = (t.expand(B, -1, -1, -1).contiguous().to(gpu) for t in (m, a))
    got = [
        ops.elsa_forward(xb, hb, mb, ab, K, 1, 1)[-1:].cpu(),
        ops.elsa_backward_features(gob, hb, mb, ab, H, W, K, 1, 1)[-1:].cpu(),
    ]
    got += [
        t[-1:].cpu() for t in ops.elsa_backward_attn_ghost(gob, xb, hb, mb, G, K, 1, 1, True, True, True, True, True)
    ]
    want = [
        ops.elsa_forward(x, h, m, a, K, 1, 1),
        ops.elsa_backward_features(go, h, m, a, H, W, K, 1, 1),
        *ops.elsa_backward_attn_ghost(go, x, h, m, G, K, 1, 1, True, True, True, True, True),
    ]
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype
        assert_close_scaled(g, w.double(), torch.bfloat16, f"result {k}")


# ---- FLOPs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ghost", [None, "broadcast"])
def test_flop_counter_counts_the_multiply_adds(ghost):
    """FlopCounterMode sees the op, forward and backward; the count equals two FLOPs per multiply-add of
    the definition, counted here by walking its index space."""
    from torch.utils.flop_counter import FlopCounterMode

    B, C, H, W, G, K, s = 2, 6, 7, 9, 3, 3, 2
    x, h, m, a = make_inputs(B=B, C=C, H=H, W=W, G=G, K=K, stride=s, ghost=ghost)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    products = sum(1 for _ in itertools.product(range(B), range(C), range(Ho), range(Wo), range(K), range(K)))
    weighting = products if m is not None else 0  # m * h + a: one multiply-add per tap with a multiplicative kernel
    with FlopCounterMode(display=False) as counter:
        out = elsa_function(x, h, m, a, kernel_size=K, stride=s)
    assert counter.get_total_flops() == 2 * (products + weighting)
    live = [t for t in (x, h, m, a) if t is not None]
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(out.sum(), live)
    counts = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["elsa_backward_features"] == 2 * (products + weighting)
    # d/dm: go * x * h (two products per tap), d/da: go * x (one)
    ghosts = 2 * products + products if ghost else 0
    assert counts["elsa_backward_attn_ghost"] == 2 * (products + weighting + ghosts)
