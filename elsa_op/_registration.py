"""What ``torch.library`` needs besides the compiled kernels: the fake (meta) kernels of the three
``elsa_op`` operators, for tracing, ``torch.compile`` and ``torch.export``, and the autograd formula of
``elsa_op::elsa_forward``, whose backward is itself made of the two registered backward operators, and
``elsa_op::check_cuda_arch``, which the CUDA kernels call once per GPU before their first launch there.

Importing this module registers them; ``elsa_op/__init__.py`` does so once, right after loading ``_C``.
Users call the operator through :func:`elsa_op.elsa_function`.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import SymInt, Tensor

from ._archs import cuda_arch_error
from .checks import ghost_accumulation_dtype

_ops = torch.ops.elsa_op

_Size = int | SymInt


def _out_size(size: _Size, stride: int) -> _Size:
    return (size - 1) // stride + 1


def _is_channels_last(t: Tensor) -> bool:
    """The layout rule of the kernels (csrc/elsa_common.h): unit channel stride means channels-last."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def _empty_like_layout(ref: Tensor, shape: Sequence[_Size], channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


@torch.library.register_fake("elsa_op::elsa_forward")
def _elsa_forward_fake(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    B, C, H, W = features.shape
    return _empty_like_layout(features, (B, C, _out_size(H, stride), _out_size(W, stride)), _is_channels_last(features))


@torch.library.register_fake("elsa_op::elsa_backward_features")
def _elsa_backward_features_fake(
    grad_out: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    height: int,
    width: int,
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    B, C = grad_out.shape[:2]
    return _empty_like_layout(grad_out, (B, C, height, width), _is_channels_last(grad_out))


@torch.library.register_fake("elsa_op::elsa_backward_attn_ghost")
def _elsa_backward_attn_ghost_fake(
    grad_out: Tensor,
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    groups: int,
    kernel_size: int,
    dilation: int,
    stride: int,
    need_attn: bool,
    need_mul: bool,
    need_add: bool,
    mul_batched: bool,
    add_batched: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    B, C, H, W = features.shape
    Ho, Wo, KK = _out_size(H, stride), _out_size(W, stride), kernel_size * kernel_size
    if not need_attn:
        gh = features.new_empty((0,))
    elif _is_channels_last(features):
        gh = features.new_empty((B, Ho, Wo, groups, KK)).permute(0, 3, 4, 1, 2)
    else:
        gh = features.new_empty((B, groups, KK, Ho, Wo))
    acc = ghost_accumulation_dtype(features.dtype)

    def ghost_grad(need: bool, batched: bool) -> Tensor:
        shape = ((B, C, kernel_size, kernel_size) if batched else (C, kernel_size, kernel_size)) if need else (0,)
        return features.new_empty(shape, dtype=acc)

    return gh, ghost_grad(need_mul, mul_batched), ghost_grad(need_add, add_batched)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
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


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
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


def _no_double_backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    raise RuntimeError(
        "the ELSA operator has no second derivative (double backward is not implemented); "
        "differentiate elsa_reference instead where one is needed"
    )


# Differentiating the backward ops (create_graph=True, then grad again) is refused with a clear error
# instead of autograd's not-implemented fallback, which warns and gives missing second-order gradients.
for _op in ("elsa_backward_features", "elsa_backward_attn_ghost"):
    torch.library.register_autograd(f"elsa_op::{_op}", _no_double_backward)


_lib = torch.library.Library("elsa_op", "FRAGMENT")
_lib.define("check_cuda_arch(int device) -> ()")


def built_cuda_archs() -> list[str]:
    """The archs ``elsa_op._C`` has CUDA code for (``sm_80``: SASS, ``compute_90``: PTX); none without CUDA."""
    recorded = torch.ops.elsa_op.cuda_archs() if hasattr(torch.ops.elsa_op, "cuda_archs") else ""
    return [a for a in recorded.split("/") if a]


def _check_cuda_arch(device: int) -> None:
    error = cuda_arch_error(
        built_cuda_archs(),
        torch.cuda.get_device_capability(device),
        torch.cuda.get_device_name(device),
    )
    if error is not None:
        raise RuntimeError(error)


_lib.impl("check_cuda_arch", _check_cuda_arch, "CompositeExplicitAutograd")
