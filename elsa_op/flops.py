"""Multiply-add counts of the ELSA operators, so that FLOP counters see them.

Registered with ``torch.utils.flop_counter`` (``FlopCounterMode`` counts forward and backward, two FLOPs
per multiply-add as for convolutions). mmengine's ``get_model_complexity_info`` (mmdet's and mmseg's
``get_flops.py``) counts multiply-adds with its own handles: ``elsa_mm`` registers :func:`elsa_forward_macs`
there.

With N = B * C * Ho * Wo output elements and K * K taps, each element takes K * K products with the
features, and with a multiplicative ghost kernel K * K more to weight the attention (``m * h + a``: the
additive kernel is an add, not counted, as a convolution's bias is not):

- forward, grad of the features, grad of the attention: N * K * K * (1 + has_ghost_mul)
- grad of the ghost kernels: N * K * K * (need_add + 2 * need_mul), counted as if computed apart from the
  attention's gradient (the kernels share the products between them)
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

_ops = torch.ops.elsa_op

# FlopCounterMode hands the formulas the shapes of the tensor arguments (None for absent ones) and the
# other arguments as they are.
_Shape = Sequence[int]


def _taps(out_shape: _Shape, kernel_size: int) -> int:
    return math.prod(out_shape) * kernel_size * kernel_size


def elsa_forward_macs(out_shape: _Shape, kernel_size: int, has_ghost_mul: bool) -> int:
    """Multiply-adds of one forward call.

    Args:
        out_shape (Sequence[int]): shape of the output, [B, C, Ho, Wo].
        kernel_size (int): window size K.
        has_ghost_mul (bool): whether a multiplicative ghost kernel weights the attention.

    Returns:
        int: ``B * C * Ho * Wo * K * K * (1 + has_ghost_mul)``.
    """
    return _taps(out_shape, kernel_size) * (1 + bool(has_ghost_mul))


@register_flop_formula(_ops.elsa_forward)
def _forward_flops(
    features: _Shape,
    h_attn: _Shape,
    ghost_mul: _Shape | None,
    ghost_add: _Shape | None,
    kernel_size: int,
    dilation: int,
    stride: int,
    out_shape: _Shape,
    **kwargs: Any,
) -> int:
    return 2 * elsa_forward_macs(out_shape, kernel_size, ghost_mul is not None)


@register_flop_formula(_ops.elsa_backward_features)
def _backward_features_flops(
    grad_out: _Shape,
    h_attn: _Shape,
    ghost_mul: _Shape | None,
    ghost_add: _Shape | None,
    height: int,
    width: int,
    kernel_size: int,
    dilation: int,
    stride: int,
    out_shape: _Shape,
    **kwargs: Any,
) -> int:
    return 2 * elsa_forward_macs(grad_out, kernel_size, ghost_mul is not None)


@register_flop_formula(_ops.elsa_backward_attn_ghost)
def _backward_attn_ghost_flops(
    grad_out: _Shape,
    features: _Shape,
    h_attn: _Shape,
    ghost_mul: _Shape | None,
    groups: int,
    kernel_size: int,
    dilation: int,
    stride: int,
    need_attn: bool,
    need_mul: bool,
    need_add: bool,
    mul_batched: bool,
    add_batched: bool,
    out_shape: Any,
    **kwargs: Any,
) -> int:
    attn = elsa_forward_macs(grad_out, kernel_size, ghost_mul is not None) if need_attn else 0
    return 2 * (attn + _taps(grad_out, kernel_size) * (int(need_add) + 2 * int(need_mul)))
