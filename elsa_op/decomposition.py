"""How the ELSA operator is written in standard operators, for exporters (ONNX).

During ``torch.onnx.export(model, x, path, dynamo=True)`` (``torch.onnx.is_in_onnx_export()``),
:func:`elsa_op.elsa_function` traces :func:`elsa_forward_decomposition` in place of the compiled operator,
so that plain exports of our models work and the file needs no part of this project to run. Eager
execution, autograd, ``torch.compile`` and AOTInductor keep the operator. The decomposition is not put in
torch's global decomposition table: inductor treats an operator with a registered decomposition as one it
should decompose, and refuses to fall back to its kernel when the ``CI`` environment variable is set.
A program already made by ``torch.export`` can be decomposed with :func:`decompositions`.

Two forms (:data:`FORMS`), chosen with :func:`decomposition_form`:

- ``"windows"`` (the default): one Gather takes every pixel's K * K window out of the zero-padded
  features, and one batched MatMul weighs each window's taps by the pixel's attention, so that a layer is
  a handful of nodes whatever K is. It holds the K * K windows at once: K * K times the features' memory.
- ``"taps"``: a sum over the K * K taps; for tap (p, q), the padded features shifted by the tap's offset
  are one strided slice, multiplied by the tap's attention and accumulated. Its intermediates are each the
  size of the features, but a layer is about 4 * K * K nodes, which takes much longer to export and runs
  slower in onnxruntime.

In both, the multiplicative ghost kernel scales the taps, and an additive ghost kernel shared by the batch is
a depthwise convolution of the features, added once (a per-image one is weighed with the taps: a
convolution's group count cannot follow a dynamic batch).
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FORMS", "decomposition_form", "decompositions", "elsa_forward_decomposition"]

FORMS = ("windows", "taps")
_FORM: contextvars.ContextVar[str] = contextvars.ContextVar("elsa_decomposition_form", default="windows")


@contextlib.contextmanager
def decomposition_form(form: str) -> Iterator[None]:
    """Within the block, the ELSA operator is exported in ``form`` (one of :data:`FORMS`)::

        with elsa_op.decomposition.decomposition_form("taps"):
            torch.onnx.export(model, (x,), dynamo=True)

    Args:
        form (str): ``"windows"`` (the default outside the block) or ``"taps"``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


def _window_index(Ho: int, Wo: int, Wp: int, K: int, dilation: int, stride: int, device: torch.device) -> Tensor:
    """Flat positions in the padded ``[Hp * Wp]`` plane of each output pixel's K * K window taps.

    Returns:
        Tensor[Ho * Wo * K * K]: ``(y * stride + p * dilation) * Wp + x * stride + q * dilation`` in
        ``(y, x, p, q)`` order (built from ``arange``, so that exporters keep the sizes symbolic).
    """
    rows = torch.arange(Ho, device=device) * stride
    cols = torch.arange(Wo, device=device) * stride
    taps = torch.arange(K, device=device) * dilation
    row_index = (rows.reshape(-1, 1, 1, 1) + taps.reshape(1, 1, -1, 1)) * Wp
    return (row_index + cols.reshape(1, -1, 1, 1) + taps.reshape(1, 1, 1, -1)).reshape(-1)


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


def _windows_form(
    padded: Tensor, h_attn: Tensor, mul: Tensor | None, add: Tensor | None, K: int, d: int, s: int
) -> Tensor:
    """The sum over each window as one Gather and one batched MatMul: [B, G, C/G, Ho * Wo] out."""
    B, G, Cg, Hp, Wp = padded.shape
    Ho, Wo = h_attn.shape[3], h_attn.shape[4]
    index = _window_index(Ho, Wo, Wp, K, d, s, padded.device)
    # [B, G, Hp * Wp, C/G]: a pixel's channels of a group side by side, so that each tap gathers a row of them.
    pixels = padded.reshape(B, G, Cg, Hp * Wp).transpose(2, 3)
    windows = pixels.index_select(2, index).reshape(B, G, Ho * Wo, K * K, Cg)
    taps = windows if mul is None else windows * mul
    weight = h_attn.reshape(B, G, K * K, Ho * Wo).transpose(2, 3).unsqueeze(3)  # [B, G, Ho * Wo, 1, K*K]
    out = torch.matmul(weight, taps).squeeze(3)  # [B, G, Ho * Wo, C/G]
    if add is not None:
        out = out + (windows * add).sum(3)
    return out.transpose(2, 3)


def _taps_form(
    padded: Tensor, h_attn: Tensor, mul: Tensor | None, add: Tensor | None, K: int, d: int, s: int
) -> Tensor:
    """The sum over the K * K taps, one strided slice each: [B, G, C/G, Ho * Wo] out."""
    B, G, Cg = padded.shape[:3]
    Ho, Wo = h_attn.shape[3], h_attn.shape[4]
    out: Tensor | None = None
    for p in range(K):
        for q in range(K):
            t = p * K + q
            weight = h_attn[:, :, t : t + 1]  # [B, G, 1, Ho, Wo]
            if mul is not None:
                weight = weight * mul[:, :, 0, t].unsqueeze(-1).unsqueeze(-1)
            if add is not None:
                weight = weight + add[:, :, 0, t].unsqueeze(-1).unsqueeze(-1)
            term = _tap(padded, p * d, q * d, Ho, Wo, s) * weight
            out = term if out is None else out + term
    assert out is not None  # K >= 1
    return out.reshape(B, G, Cg, Ho * Wo)


def elsa_forward_decomposition(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    stride: int,
    form: str | None = None,
) -> Tensor:
    """``elsa_op::elsa_forward`` in standard operators (pad, gather or slices, multiplies, sums, a depthwise
    convolution).

    Args:
        features (Tensor[B, C, H, W]): the values, in either memory layout.
        h_attn (Tensor[B, G, K*K, Ho, Wo]): attention per output pixel, shared by the C/G channels of a group.
        ghost_mul (Tensor[C, K, K] or Tensor[B, C, K, K], optional): multiplicative ghost kernel; None means 1.
        ghost_add (Tensor[C, K, K] or Tensor[B, C, K, K], optional): additive ghost kernel; None means 0.
        kernel_size (int): odd window size K.
        dilation (int): spacing of the window taps.
        stride (int): output stride; ``Ho = (H - 1) // stride + 1``.
        form (str, optional): one of :data:`FORMS`; None takes the one :func:`decomposition_form` set
            (``"windows"`` by default). Default: None.

    Returns:
        Tensor[B, C, Ho, Wo]: the operator's output, in the features' dtype (sums are taken in the
        promoted dtype of the features and the ghost kernels, as the operator does).
    """
    form = _FORM.get() if form is None else form
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    B, C, H, W = features.shape
    G, Ho, Wo = h_attn.shape[1], h_attn.shape[3], h_attn.shape[4]
    K, d, s = kernel_size, dilation, stride
    r = K // 2 * d
    dtype = features.dtype
    for ghost in (ghost_mul, ghost_add):
        dtype = dtype if ghost is None else torch.promote_types(dtype, ghost.dtype)
    # Channels of a group share the attention: [B, G, C/G, Hp, Wp] features against [B, G, K*K, Ho, Wo] taps.
    padded = F.pad(features.to(dtype), (r, r, r, r)).reshape(B, G, C // G, H + 2 * r, W + 2 * r)
    h = h_attn.to(dtype)

    def per_tap(ghost: Tensor) -> Tensor:  # [C or B*C, K, K] -> [1 or B, G, 1, K*K, C/G]
        return ghost.to(dtype).reshape(-1, G, C // G, K * K).transpose(2, 3).unsqueeze(2)

    mul = per_tap(ghost_mul) if ghost_mul is not None else None
    add_as_conv = ghost_add is not None and ghost_add.dim() == 3
    add = per_tap(ghost_add) if ghost_add is not None and not add_as_conv else None
    if form == "windows":
        out = _windows_form(padded, h, mul, add, K, d, s)
    else:
        out = _taps_form(padded, h, mul, add, K, d, s)
    result = out.reshape(B, C, Ho, Wo)
    if add_as_conv:
        assert ghost_add is not None
        kernel = ghost_add.reshape(C, 1, K, K).to(dtype)
        result = result + F.conv2d(features.to(dtype), kernel, stride=s, padding=r, dilation=d, groups=C)
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
