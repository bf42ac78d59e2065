"""The CUDA operator on a GPU: against the CPU operator in float64 over the cases of the emulation tests, both
layouts and the layouts of the results, reruns, autocast, torch.compile, opcheck and indices past 2^31.
Skipped without a GPU; tests/test_cuda_emulation.py checks the same kernels' maths on CPU."""

import itertools

import pytest
import torch
from conftest import cuda_only
from op_cases import GEOMETRIES, assert_close_scaled, geometry_id, make_case

from elsa_op import elsa_function, elsa_reference

pytestmark = cuda_only
ops = torch.ops.elsa_op

CASES = GEOMETRIES + [
    (1, 12, 7, 8, 2, 3, 1, 1),  # heads of 6 channels: scalar loads
    (1, 64, 9, 8, 1, 13, 1, 1),  # a head split into chunks
    (1, 16, 6, 5, 2, 15, 1, 1),  # runtime K
]


def _on(t, device):
    return t.to(device) if t is not None else None


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


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "slice", "misaligned"])
@pytest.mark.parametrize("ghost", ["broadcast", "batched", "mixed", None])
@pytest.mark.parametrize("case", CASES, ids=geometry_id)
def test_cuda_matches_cpu_float64(case, ghost, layout):
    """Same values, same shapes and the same strides (the layout of each result) as the CPU operator."""
    B, C, H, W, G, K, d, s = case
    _, _, _, m, a, x, h, go = make_case(*case, torch.float64, ghost, layout)
    want = _all_ops(x, h, go, m, a, K, d, s, "cpu")
    got = _all_ops(x, h, go, m, a, K, d, s, "cuda")
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, k
        assert g.stride() == w.stride() or g.numel() <= 1, (k, g.stride(), w.stride())
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10, msg=lambda msg, k=k: f"result {k}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES[1:6], ids=geometry_id)
def test_cuda_low_precision_matches_the_reference(case, dtype):
    """Half and bfloat16 features with float32 ghost kernels, accumulated in float32."""
    B, C, H, W, G, K, d, s = case
    x, h, go, m, a, xl, hl, gol = make_case(*case, dtype, "broadcast", "channels_last")
    leaves = [t.double().requires_grad_() for t in (x, h, m, a)]
    ref = elsa_reference(*leaves, kernel_size=K, dilation=d, stride=s)
    want = torch.autograd.grad(ref, leaves, go.double())
    dev = [t.detach().cuda().requires_grad_() for t in (xl, hl, m, a)]
    out = elsa_function(*dev, kernel_size=K, dilation=d, stride=s)
    got = torch.autograd.grad(out, dev, gol.cuda())
    tol = torch.float32 if dtype == torch.float32 else torch.bfloat16  # (half: bfloat16's looser tolerance)
    assert_close_scaled(out.cpu(), ref.detach(), tol, "forward")
    for g, w, name in zip(got, want, ("features", "attention", "ghost_mul", "ghost_add"), strict=True):
        ghost = name.startswith("ghost")
        assert g.dtype == (torch.float32 if ghost else dtype)
        assert_close_scaled(g.cpu(), w, torch.float32 if ghost and dtype != torch.float32 else tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_reruns_are_bit_identical(dtype, layout):
    """No atomics: the same inputs give the same bits, forward and backward."""
    _, _, _, m, a, x, h, go = make_case(4, 96, 28, 28, 3, 7, 1, 1, dtype, "broadcast", layout)
    first = _all_ops(x, h, go, m, a, 7, 1, 1, "cuda")
    second = _all_ops(x, h, go, m, a, 7, 1, 1, "cuda")
    for k, (t1, t2) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(t1, t2), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_autocast_keeps_ghost_kernels_float32(dtype):
    """Under autocast the features and attention run in half/bfloat16, the ghost kernels and their gradients
    stay float32; the layer's results follow its float32 self within half-precision tolerance."""
    from elsa_op import ELSAAttention

    torch.manual_seed(0)
    layer = ELSAAttention(dim=64, num_heads=2, kernel_size=7, group_width=8, lam=1.0, gamma=1.0).cuda()
    x = torch.randn(2, 14, 14, 64, device="cuda")
    want = layer(x)
    want_grads = torch.autograd.grad(want.square().sum(), [layer.ghost_mul, layer.ghost_add])
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "elsa_op" in str(func):
                seen.append((str(func), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cuda", dtype=dtype), Record():
        out = layer(x)
    assert out.dtype == dtype
    name, dtypes = seen[0]
    assert "elsa_forward" in name and dtypes == [dtype, dtype, torch.float32, torch.float32], seen[0]
    grads = torch.autograd.grad(out.float().square().sum(), [layer.ghost_mul, layer.ghost_add])
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_scaled(g, w, torch.bfloat16, "ghost grad under autocast")


def test_cuda_torch_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _, _, _, m, a, x, h, _ = make_case(2, 32, 12, 13, 2, 7, 1, 1, torch.float32, "broadcast", "channels_last")
    x, h, m, a = (t.cuda().requires_grad_() for t in (x, h, m, a))

    @torch.compile(fullgraph=True)
    def fn(x, h, m, a):
        return elsa_function(x.relu(), h.softmax(2), m, a, kernel_size=7).sum()

    fn(x, h, m, a).backward()
    got = [t.grad.clone() for t in (x, h, m, a)]
    for t in (x, h, m, a):
        t.grad = None
    elsa_reference(x.relu(), h.softmax(2), m, a, kernel_size=7).sum().backward()
    for g, t in zip(got, (x, h, m, a), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("ghost,stride", [("broadcast", 1), ("batched", 2), ("mixed", 1), (None, 1)])
def test_cuda_opcheck_every_op(ghost, stride, layout):
    _, _, _, m, a, x, h, go = make_case(2, 12, 7, 9, 3, 3, 2, stride, torch.float64, ghost, layout)
    x, h, go, m, a = (_on(t, "cuda") for t in (x, h, go, m, a))
    torch.library.opcheck(ops.elsa_forward.default, (x, h, m, a, 3, 2, stride))
    torch.library.opcheck(ops.elsa_backward_features.default, (go, h, m, a, 7, 9, 3, 2, stride))
    mb, ab = m is not None and m.dim() == 4, a is not None and a.dim() == 4
    for need in itertools.product((False, True), repeat=3):
        args = (go, x, h, m, 3, 3, 2, stride, need[0], need[1] and m is not None, need[2] and a is not None, mb, ab)
        torch.library.opcheck(ops.elsa_backward_attn_ghost.default, args)


def test_cuda_rejects_cpu_tensors():
    """A CPU tensor handed to a CUDA op is a clear error, in the forward and in every backward op."""
    _, _, _, m, a, x, h, go = make_case(2, 6, 7, 9, 3, 3, 1, 2, torch.float64, "broadcast", "nchw")
    x, h, go, m, a = (t.cuda() for t in (x, h, go, m, a))
    with pytest.raises(RuntimeError, match="h_attn is on cpu but grad_out on cuda"):
        ops.elsa_backward_features(go, h.cpu(), m, a, 7, 9, 3, 1, 2)
    with pytest.raises(RuntimeError, match="ghost_mul is on cpu but features on cuda"):
        ops.elsa_backward_attn_ghost(go, x, h, m.cpu(), 3, 3, 1, 2, True, False, False, False, False)
    with pytest.raises(RuntimeError, match="h_attn is on cpu but features on cuda"):
        ops.elsa_backward_attn_ghost(go, x, h.cpu(), m, 3, 3, 1, 2, False, True, False, False, False)
    with pytest.raises(RuntimeError, match="h_attn is on cuda:0 but features on cpu"):
        ops.elsa_forward(x.cpu(), h, m, a, 3, 1, 2)


def test_cuda_gradcheck():
    _, _, _, m, a, x, h, _ = make_case(2, 8, 7, 9, 2, 5, 2, 2, torch.float64, "broadcast", "channels_last")
    leaves = [t.cuda().requires_grad_() for t in (x, h, m, a)]
    assert torch.autograd.gradcheck(
        lambda *t: elsa_function(*t, kernel_size=5, dilation=2, stride=2), leaves, eps=1e-6, atol=1e-7
    )


def test_cuda_indices_past_2_31():
    """bfloat16 tensors of 2^31 + 2^18 elements: the last image (offsets past 2^31) against the CPU operator."""
    B, C, H, W, G, K = 8193, 64, 64, 64, 1, 7
    if torch.cuda.mem_get_info()[0] < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    dtype = torch.bfloat16
    _, _, _, m, a, x, h, go = make_case(1, C, H, W, G, K, 1, 1, dtype, "batched", "channels_last", seed=3)

    def big(t, attn=False):
        shape = (B, H, W, G, K * K) if attn else (B, H, W, C)
        out = torch.empty(shape, dtype=dtype, device="cuda")
        out = out.permute(0, 3, 4, 1, 2) if attn else out.permute(0, 3, 1, 2)
        out[-1:] = t.cuda()
        return out

    xb, hb, gob = big(x), big(h, attn=True), big(go)
    mb, ab = (t.expand(B, -1, -1, -1).contiguous().cuda() for t in (m, a))
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
