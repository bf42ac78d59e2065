"""Inputs of the ELSA operator for its tests (test_op.py, test_cuda_emulation.py, test_export.py): one factory,
`make_inputs`, in any dtype, layout and device, the case lists the tests share, and their comparisons."""

import torch

from elsa_op import elsa_reference

# B, C, H, W, G, K, dilation, stride
GEOMETRIES = [
    (2, 16, 9, 11, 2, 1, 1, 1),
    (2, 16, 9, 11, 2, 3, 1, 1),
    (2, 24, 10, 9, 3, 5, 2, 1),
    (2, 32, 12, 13, 1, 7, 1, 2),
    (2, 32, 16, 15, 2, 7, 1, 1),  # ELSA-Swin's K = 7: most pixels take the inside-the-image paths
    (1, 16, 8, 10, 2, 9, 1, 3),
    (1, 16, 6, 7, 2, 13, 1, 1),  # the image smaller than the window
    (1, 8, 3, 2, 1, 7, 2, 2),  # 3x2 image, window 13 pixels wide
    (2, 16, 7, 9, 2, 5, 3, 2),  # dilation not a multiple of the stride
    (1, 16, 9, 7, 2, 3, 2, 4),  # stride larger than the dilation
]

# B, C, H, W, G, K, dilation, stride, dtype, then the chunk_vectors and channel_chunks launch.h's plan_attn_ghost
# gives them: heads whose fused backward pass takes an odd number of channel vectors per chunk, so that a tap's
# weighted sums in shared memory get no padding slot (5 float32 vectors, 3 bfloat16 vectors, and 3 float32
# vectors of 15 in 5 chunks with K = 11).
ODD_CHUNK_CASES = [
    (2, 40, 9, 11, 2, 7, 1, 1, torch.float32, 5, 1),
    (2, 48, 9, 11, 2, 7, 1, 1, torch.bfloat16, 3, 1),
    (1, 60, 7, 6, 1, 11, 1, 1, torch.float32, 3, 5),
]

# B, C, H, W, G, K, dilation, stride, ghost: vector blocks and scalar tails of the CPU's channel loop (37 and 45
# channels per group), windows wider than the image, pairs of interior pixels, strides and dilations.
CL_CASES = [
    (2, 64, 12, 13, 2, 7, 1, 1, "broadcast"),
    (2, 37, 9, 11, 1, 3, 1, 1, "batched"),
    (1, 90, 10, 16, 2, 5, 2, 1, None),
    (2, 12, 11, 9, 3, 3, 1, 2, "broadcast"),
    (2, 10, 13, 7, 5, 5, 1, 3, "batched"),
    (1, 6, 3, 2, 2, 7, 1, 1, "broadcast"),
    (2, 24, 8, 8, 3, 3, 3, 2, None),
]

# Layouts of the features and grad_out: "slice" is a channel slice of a wider channels-last tensor, as a model's
# q/k/v projection hands it over, and "misaligned" the same slice shifted off 16-byte alignment. The attention
# goes with them: [B, G, K*K, Ho, Wo] memory for "nchw", [B, Ho, Wo, G, K*K] for the others.
LAYOUTS = ("nchw", "channels_last", "slice", "misaligned")

# Ghost kernels: one [C, K, K] for the batch, one [B, C, K, K] per image, the multiplicative one shared and the
# additive one per image, or none.
GHOSTS = ("broadcast", "batched", "mixed", None)


def geometry_id(case) -> str:
    return "B{}C{}H{}W{}G{}K{}d{}s{}".format(*case)


def layout_as(t, layout):
    """features-like [B, C, H, W] in the given memory layout, on t's device (values unchanged)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pad = 1 if layout == "misaligned" else 0  # leading channels before the slice
    B, C, H, W = t.shape
    wide = torch.zeros(B, H, W, 3 * C + pad, dtype=t.dtype, device=t.device)
    wide[..., C + pad : 2 * C + pad] = t.permute(0, 2, 3, 1)
    return wide[..., C + pad : 2 * C + pad].permute(0, 3, 1, 2)


def attn_layout_as(h, layout):
    """h [B, G, K*K, Ho, Wo] (or [B, K*K, Ho, Wo]); channels-last models keep it as [B, Ho, Wo, G, K*K] memory."""
    if layout == "nchw":
        return h.contiguous()
    h5 = h if h.dim() == 5 else h.unsqueeze(1)
    return h5.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def make_inputs(
    B=2,
    C=6,
    H=7,
    W=9,
    G=3,
    K=3,
    stride=1,
    ghost="broadcast",
    dtype=torch.float64,
    *,
    layout="nchw",
    device="cpu",
    grad=True,
    seed=None,
    attn_4d=False,
    grad_out=False,
):
    """(features, h_attn, ghost_mul, ghost_add), and grad_out last if `grad_out`: standard normal values drawn
    in float64 from a generator seeded by the shape (or `seed`), so a case has the same values on every device
    and in every layout.

    Features, attention and grad_out take `dtype`; the ghost kernels take the accumulation type beside half
    and bfloat16 features (float32, what autocast hands the op), else `dtype`. `layout` is one of LAYOUTS;
    `attn_4d` gives a single group's attention as [B, K*K, Ho, Wo]. With `grad` the inputs (not grad_out) are
    leaves that require gradients.
    """
    if ghost not in GHOSTS:
        raise ValueError(f"ghost must be one of {GHOSTS}, got {ghost!r}")
    if attn_4d and G != 1:
        raise ValueError(f"a 4-D attention has one group, got G={G}")
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + K * 10 + stride if seed is None else seed)
    ghost_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    shared, per_image = (C, K, K), (B, C, K, K)
    ghost_shapes = {
        "broadcast": (shared, shared),
        "batched": (per_image, per_image),
        "mixed": (shared, per_image),
        None: (None, None),
    }[ghost]

    def draw(shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x = layout_as(draw((B, C, H, W), dtype), layout)
    h = attn_layout_as(draw((B, K * K, Ho, Wo) if attn_4d else (B, G, K * K, Ho, Wo), dtype), layout)
    m, a = (draw(shape, ghost_dtype) if shape else None for shape in ghost_shapes)
    inputs = [t.requires_grad_(grad) if t is not None else None for t in (x, h, m, a)]
    if grad_out:
        inputs.append(layout_as(draw((B, C, Ho, Wo), dtype), layout))
    return tuple(inputs)


def channels_last(x, h):
    """New leaves with the values of x and h in the layout a channels-last model produces: NHWC features and
    [B, H, W, G, K*K] attention memory (a 4-D attention gains its group dimension)."""
    x_cl = layout_as(x.detach(), "channels_last").requires_grad_(x.requires_grad)
    h_cl = attn_layout_as(h.detach(), "channels_last").requires_grad_(h.requires_grad)
    return x_cl, h_cl


def make_case(B, C, H, W, G, K, dilation, stride, dtype, ghost, layout, seed=0):
    """A case of GEOMETRIES as the kernel tests take it: (x, h, go, m, a) in NCHW memory, then x, h and go
    again in `layout`; nothing requires gradients. (`dilation` does not change the inputs' shapes.)"""
    x, h, m, a, go = make_inputs(B, C, H, W, G, K, stride, ghost, dtype, grad=False, seed=seed, grad_out=True)
    return x, h, go, m, a, layout_as(x, layout), attn_layout_as(h, layout), layout_as(go, layout)


def reference_grads(x, h, go, m, a, K, dilation, stride):
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, h, m, a)]
    out = elsa_reference(*leaves, kernel_size=K, dilation=dilation, stride=stride)
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, live, go.double()))
    return out, [next(grads) if t is not None else None for t in leaves]


def assert_close_scaled(got, want, dtype, what):
    assert not torch.isnan(got).any(), f"{what}: elements no thread wrote (NaN poison survived)"
    scale = want.abs().max().item() + 1e-3
    tol = {torch.float64: 1e-11, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(
        got.double() / scale, want.double() / scale, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}"
    )
