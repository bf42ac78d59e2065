"""Inputs and comparisons shared by the CUDA tests and the CUDA emulation tests."""

import torch

from elsa_op import elsa_reference

GEOMETRIES = [
    # B, C, H, W, G, K, dilation, stride
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


def geometry_id(case) -> str:
    return "B{}C{}H{}W{}G{}K{}d{}s{}".format(*case)


def layout_as(t, layout, pad=0):
    """features-like [B, C, H, W] in the given memory layout (values unchanged)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    # A channel slice of a wider channels-last tensor, as a model's q/k/v projection hands it over; `pad`
    # leading channels shift it off 16-byte alignment.
    B, C, H, W = t.shape
    wide = torch.zeros(B, H, W, 3 * C + pad, dtype=t.dtype)
    wide[..., C + pad : 2 * C + pad] = t.permute(0, 2, 3, 1)
    return wide[..., C + pad : 2 * C + pad].permute(0, 3, 1, 2)


def attn_layout_as(h, layout):
    """h [B, G, K*K, Ho, Wo]; channels-last models keep it as [B, Ho, Wo, G, K*K] memory."""
    return h.contiguous() if layout == "nchw" else h.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def make_case(B, C, H, W, G, K, dilation, stride, dtype, ghost, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    h = torch.randn(B, G, K * K, Ho, Wo, generator=g).to(dtype)
    go = torch.randn(B, C, Ho, Wo, generator=g).to(dtype)
    # Ghost kernels in the accumulation type beside half/bfloat16 (as under autocast), else the features' dtype.
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = {
        "broadcast": ((C, K, K), (C, K, K)),
        "batched": ((B, C, K, K), (B, C, K, K)),
        "mixed": ((C, K, K), (B, C, K, K)),
        None: (None, None),
    }[ghost]
    m, a = (torch.randn(s, generator=g).to(gdtype) if s else None for s in shapes)
    pad = 1 if layout == "misaligned" else 0
    xl = layout_as(x, "slice" if pad else layout, pad)
    gol = layout_as(go, "slice" if pad else layout, pad)
    return x, h, go, m, a, xl, attn_layout_as(h, layout), gol


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
