"""The ELSA operator as a `torch.library` custom op: Python API, fake kernels and autograd."""

import torch
from torch import Tensor

from .checks import check_elsa_args, ghost_accumulation_dtype
from .reference import elsa_reference

_ops = torch.ops.elsa_op

BACKENDS = ("kernels", "reference")


def elsa_function(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None = None,
    ghost_add: Tensor | None = None,
    *,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    backend: str = "kernels",
) -> Tensor:
    """Local attention with per-pixel Hadamard attention and ghost kernels.

    ``out[b, c, i, j] = sum_{p, q < K} x[b, c, i*s + (p - K//2)*d, j*s + (q - K//2)*d]
    * (m[c, p, q] * h[b, c // (C/G), p*K + q, i, j] + a[c, p, q])``, with zero padding.

    Args:
        features (Tensor[B, C, H, W]): the values ``x``.
        h_attn (Tensor[B, G, K*K, Ho, Wo] or Tensor[B, K*K, Ho, Wo]): attention per output pixel,
            shared by the C/G channels of each group; 4-D means G = 1.
        ghost_mul (Tensor[C, K, K] or Tensor[B, C, K, K], optional): multiplicative ghost kernel ``m``;
            None means 1. A 3-D kernel is broadcast over the batch (and its gradient summed over it).
        ghost_add (Tensor[C, K, K] or Tensor[B, C, K, K], optional): additive ghost kernel ``a``;
            None means 0.
        kernel_size (int): odd window size K.
        dilation (int): spacing of the window taps. Default: 1.
        stride (int): output stride s; ``Ho = (H - 1) // s + 1``. Default: 1.
        backend (str): ``"kernels"``, the compiled operator, or ``"reference"``, the pure-PyTorch
            definition (:func:`elsa_op.elsa_reference`: slow and memory-hungry, for checking).
            Default: ``"kernels"``.

    Returns:
        Tensor[B, C, Ho, Wo], in the features' dtype. Under ``torch.autocast`` the features and the
        attention are cast to the autocast dtype, as a convolution's inputs are, and the ghost kernels to
        float32: they are C*K*K values whose gradients sum a product over every pixel of the batch, so
        they and their gradients stay float32. Outside autocast, ghost kernels take the features' dtype
        or, beside half or bfloat16 features, float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_type = features.device.type if isinstance(features, Tensor) else "cpu"
    # Autocast exists for real devices only; asking about "meta" raises.
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        features, h_attn = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (features, h_attn)
        )
        ghost_mul, ghost_add = (
            t.to(ghost_accumulation_dtype(dtype)) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (ghost_mul, ghost_add)
        )
    check_elsa_args(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
    if backend == "reference":
        return elsa_reference(
            features, h_attn, ghost_mul, ghost_add, kernel_size=kernel_size, dilation=dilation, stride=stride
        )
    if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("elsa_op::elsa_forward", "CUDA"):
        raise RuntimeError(
            f"elsa_op._C was built without {features.device.type} kernels; rebuild it where nvcc is "
            "available (or with FORCE_CUDA=1): python setup.py build_ext --inplace"
        )
    if h_attn.dim() == 4:
        h_attn = h_attn.unsqueeze(1)
    return _ops.elsa_forward(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride)


def _out_size(size, stride: int):
    return (size - 1) // stride + 1


def _is_channels_last(t: Tensor) -> bool:
    """The layout rule of the kernels (elsa_common.h): unit channel stride means channels-last."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def _empty_like_layout(ref: Tensor, shape, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


@torch.library.register_fake("elsa_op::elsa_forward")
def _elsa_forward_fake(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride):
    B, C, H, W = features.shape
    return _empty_like_layout(features, (B, C, _out_size(H, stride), _out_size(W, stride)), _is_channels_last(features))


@torch.library.register_fake("elsa_op::elsa_backward_features")
def _elsa_backward_features_fake(grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size, dilation, stride):
    B, C = grad_out.shape[:2]
    return _empty_like_layout(grad_out, (B, C, height, width), _is_channels_last(grad_out))


@torch.library.register_fake("elsa_op::elsa_backward_attn_ghost")
def _elsa_backward_attn_ghost_fake(
    grad_out,
    features,
    h_attn,
    ghost_mul,
    groups,
    kernel_size,
    dilation,
    stride,
    need_attn,
    need_mul,
    need_add,
    mul_batched,
    add_batched,
):
    B, C, H, W = features.shape
    Ho, Wo, KK = _out_size(H, stride), _out_size(W, stride), kernel_size * kernel_size
    if not need_attn:
        gh = features.new_empty((0,))
    elif _is_channels_last(features):
        gh = features.new_empty((B, Ho, Wo, groups, KK)).permute(0, 3, 4, 1, 2)
    else:
        gh = features.new_empty((B, groups, KK, Ho, Wo))
    acc = ghost_accumulation_dtype(features.dtype)

    def ghost_grad(need, batched):
        shape = ((B, C, kernel_size, kernel_size) if batched else (C, kernel_size, kernel_size)) if need else (0,)
        return features.new_empty(shape, dtype=acc)

    return gh, ghost_grad(need_mul, mul_batched), ghost_grad(need_add, add_batched)


def _setup_context(ctx, inputs, output):
    features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride = inputs
    need_x, need_h, need_m, need_a = ctx.needs_input_grad[:4]
    ctx.geometry = (features.shape[2], features.shape[3], h_attn.shape[1], kernel_size, dilation, stride)
    ctx.ghost_batched = tuple(t is not None and t.dim() == 4 for t in (ghost_mul, ghost_add))
    ctx.ghost_dtypes = tuple(t.dtype if t is not None else None for t in (ghost_mul, ghost_add))
    ctx.channels_last = _is_channels_last(features)
    # Keep only what the requested gradients read.
    ctx.save_for_backward(
        features if (need_h or need_m or need_a) else None,
        h_attn if (need_x or need_m) else None,
        ghost_mul if (need_x or need_h) else None,
        ghost_add if need_x else None,
    )


def _backward(ctx, grad_out):
    features, h_attn, ghost_mul, ghost_add = ctx.saved_tensors
    H, W, G, K, d, s = ctx.geometry
    need_x, need_h, need_m, need_a = ctx.needs_input_grad[:4]
    # The layout the forward pass used; a channels-last model's grad_out already has it.
    if ctx.channels_last:
        grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous(memory_format=torch.channels_last)
    else:
        grad_out = grad_out.contiguous()
    gx = gh = gm = ga = None
    if need_x:
        gx = _ops.elsa_backward_features(grad_out, h_attn, ghost_mul, ghost_add, H, W, K, d, s)
    if need_h or need_m or need_a:
        mul_batched, add_batched = ctx.ghost_batched
        gh, gm, ga = _ops.elsa_backward_attn_ghost(
            grad_out, features, h_attn, ghost_mul, G, K, d, s, need_h, need_m, need_a, mul_batched, add_batched
        )
        # Ghost gradients come in float32 (float64 for float64): cast them to their kernels' dtype.
        gh, gm, ga = (g if need else None for g, need in ((gh, need_h), (gm, need_m), (ga, need_a)))
        gm, ga = (
            g.to(dtype) if g is not None else None
            for g, dtype in ((gm, ctx.ghost_dtypes[0]), (ga, ctx.ghost_dtypes[1]))
        )
    return gx, gh, gm, ga, None, None, None


torch.library.register_autograd("elsa_op::elsa_forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the ELSA operator has no second derivative (double backward is not implemented); "
        "differentiate elsa_reference instead where one is needed"
    )


# Differentiating the backward ops (create_graph=True, then grad again) is refused with a clear error
# instead of autograd's not-implemented fallback, which warns and gives missing second-order gradients.
for _op in ("elsa_backward_features", "elsa_backward_attn_ghost"):
    torch.library.register_autograd(f"elsa_op::{_op}", _no_double_backward)
