"""How the ELSA operator is written in standard operators, for exporters (ONNX).

During ``torch.onnx.export(model, x, path, dynamo=True)`` (``torch.onnx.is_in_onnx_export()``),
:func:`elsa_op.elsa_function` traces :func:`elsa_forward_decomposition` in place of the compiled operator,
so that plain exports of our models work and the file needs no part of this project to run. Eager
execution, autograd, ``torch.compile`` and AOTInductor keep the operator. The decomposition is not put in
torch's global decomposition table: inductor treats an operator with a registered decomposition as one it
should decompose, and refuses to fall back to its kernel when the ``CI`` environment variable is set.
A program already made by ``torch.export`` can be decomposed with :func:`decompositions`.

The decomposition is a sum over the K * K taps of the window. For tap (p, q), the zero-padded features
shifted by the tap's offset are one strided slice of the padded features; they are multiplied by the tap's
attention (times the multiplicative ghost kernel's tap) and accumulated. An additive ghost kernel shared by
the batch is a depthwise convolution of the features, added once; a per-image one is added to each tap's
weight instead (a convolution's group count cannot follow a dynamic batch). At run time it holds the
padded features, the running sum and one tap's product, so its memory is linear in the features, where
gathering every tap at once (``F.unfold``) would hold K * K copies of them. Of the forms tried in
onnxruntime (gathering every tap; per-tap slices in NCHW or NHWC; K taps of a row at a time), this one ran
fastest.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decompositions", "elsa_forward_decomposition"]


def _tap(padded: Tensor, row: int, col: int, rows: int, cols: int, stride: int) -> Tensor:
    """The padded features seen from one tap: ``padded[..., row + i * stride, col + j * stride]`` for
    ``i < rows``, ``j < cols`` (a strided slice of the last two axes, which exporters write as one Slice).

    Args:
        padded (Tensor[..., Hp, Wp]): the zero-padded features.
        row (int): the tap's first row.
        col (int): the tap's first column.
        rows (int): output rows Ho.
        cols (int): output columns Wo.
        stride (int): the output stride.

    Returns:
        Tensor[..., Ho, Wo]: a view of ``padded``.
    """
    span_h, span_w = (rows - 1) * stride + 1, (cols - 1) * stride + 1
    return padded[..., row : row + span_h : stride, col : col + span_w : stride]


def elsa_forward_decomposition(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    """``elsa_op::elsa_forward`` in pad / slice / mul / add (and a depthwise convolution).

    Args:
        features (Tensor[B, C, H, W]): the values, in either memory layout.
        h_attn (Tensor[B, G, K*K, Ho, Wo]): attention per output pixel, shared by the C/G channels of a group.
        ghost_mul (Tensor[C, K, K] or Tensor[B, C, K, K], optional): multiplicative ghost kernel; None means 1.
        ghost_add (Tensor[C, K, K] or Tensor[B, C, K, K], optional): additive ghost kernel; None means 0.
        kernel_size (int): odd window size K.
        dilation (int): spacing of the window taps.
        stride (int): output stride; ``Ho = (H - 1) // stride + 1``.

    Returns:
        Tensor[B, C, Ho, Wo]: the operator's output, in the features' dtype (sums are taken in the
        promoted dtype of the features and the ghost kernels, as the operator does).
    """
    B, C, H, W = features.shape
    G, Ho, Wo = h_attn.shape[1], h_attn.shape[3], h_attn.shape[4]
    K, d, s = kernel_size, dilation, stride
    r = K // 2 * d
    # Channels of a group share the attention: [B, G, C/G, Hp, Wp] features against [B, G, 1, Ho, Wo] taps.
    padded = F.pad(features, (r, r, r, r)).reshape(B, G, C // G, H + 2 * r, W + 2 * r)
    mul = ghost_mul.reshape(-1, G, C // G, K * K, 1, 1) if ghost_mul is not None else None
    add_as_conv = ghost_add is not None and ghost_add.dim() == 3
    add = ghost_add.reshape(-1, G, C // G, K * K, 1, 1) if ghost_add is not None and not add_as_conv else None
    out: Tensor | None = None
    for p in range(K):
        for q in range(K):
            t = p * K + q
            weight = h_attn[:, :, t : t + 1]  # [B, G, 1, Ho, Wo]
            if mul is not None:
                weight = weight * mul[:, :, :, t]
            if add is not None:
                weight = weight + add[:, :, :, t]
            term = _tap(padded, p * d, q * d, Ho, Wo, s) * weight
            out = term if out is None else out + term
    assert out is not None  # K >= 1
    result = out.reshape(B, C, Ho, Wo)
    if add_as_conv:
        assert ghost_add is not None
        kernel = ghost_add.reshape(C, 1, K, K).to(result.dtype)
        result = result + F.conv2d(features.to(result.dtype), kernel, stride=s, padding=r, dilation=d, groups=C)
    return result.to(features.dtype)


def decompositions() -> dict[torch._ops.OpOverload, Callable[..., Tensor]]:
    """The decomposition table of the ELSA operator, for a program made by ``torch.export``.

    ``torch.onnx.export`` of a model needs nothing: the model traces the decomposition itself. A program
    exported beforehand still holds the operator; decompose it before handing it to an exporter::

        table = torch.export.default_decompositions()
        table.update(elsa_op.decomposition.decompositions())
        program = torch.export.export(model, (x,)).run_decompositions(table)

    Returns:
        dict: ``{torch.ops.elsa_op.elsa_forward.default: elsa_forward_decomposition}``.
    """
    return {torch.ops.elsa_op.elsa_forward.default: elsa_forward_decomposition}
