"""How the ELSA operator is written in standard operators, for exporters (ONNX).

During ``torch.onnx.export(model, x, path, dynamo=True)`` (``torch.onnx.is_in_onnx_export()``),
:func:`elsa_op.elsa_function` traces :func:`elsa_forward_decomposition` in place of the compiled operator,
so that plain exports of our models work and the file needs no part of this project to run. Eager
execution, autograd, ``torch.compile`` and AOTInductor keep the operator. The decomposition is not put in
torch's global decomposition table: inductor treats an operator with a registered decomposition as one it
should decompose, and refuses to fall back to its kernel when the ``CI`` environment variable is set.
A program already made by ``torch.export`` can be decomposed with :func:`decompositions`.

Three forms (:data:`FORMS`), chosen with :func:`decomposition_form`:

- ``"blocks"`` (the default): the output is cut into blocks of K x K pixels. One Gather takes each
  block's patch of the zero-padded features (the S x S pixels its windows cover, S = K + (K - 1) *
  dilation), a second Gather, whose index depends on K and the dilation only, spreads the block's
  attention into a ``[K * K, S * S]`` weight matrix (zero where a pixel's window does not reach), and one
  batched MatMul gives the block. It holds the patches, (S / K)^2 times the features, and the weight
  matrices, S * S numbers per pixel and group. It is written for stride 1 with no ghost kernel on the
  taps (an additive one shared by the batch is the convolution below), and for an image size fixed at
  export (the batch may stay dynamic): cutting a dynamic size into blocks would tie the program to
  whether the example's size was a multiple of K. Other calls take the windows form.
- ``"windows"``: one Gather takes every pixel's K * K window out of the zero-padded features, and one
  batched MatMul weighs each window's taps by the pixel's attention. It holds the K * K windows at once:
  K * K times the features' memory.
- ``"taps"``: a sum over the K * K taps; for tap (p, q), the padded features shifted by the tap's offset
  are one strided slice, multiplied by the tap's attention and accumulated. Its intermediates are each the
  size of the features, but a layer is about 4 * K * K nodes, which takes much longer to export and runs
  slower in onnxruntime.

In the blocks and windows forms a layer is a handful of nodes whatever K is. The multiplicative ghost
kernel scales the taps, and an additive ghost kernel shared by the batch is a depthwise convolution of the
features, added once (a per-image one is weighed with the taps: a convolution's group count cannot follow
a dynamic batch).
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FORMS", "decomposition_form", "decompositions", "elsa_forward_decomposition"]

FORMS = ("blocks", "windows", "taps")
_FORM: contextvars.ContextVar[str] = contextvars.ContextVar("elsa_decomposition_form", default=FORMS[0])


@contextlib.contextmanager
def decomposition_form(form: str) -> Iterator[None]:
    """Within the block, the ELSA operator is exported in ``form`` (one of :data:`FORMS`)::

        with elsa_op.decomposition.decomposition_form("windows"):
            torch.onnx.export(model, (x,), dynamo=True)

    Args:
        form (str): ``"blocks"`` (the default outside the block), ``"windows"`` or ``"taps"``.
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


def _gather_windows(padded: Tensor, Ho: int, Wo: int, K: int, d: int, s: int) -> Tensor:
    """Every output pixel's K x K window of ``padded`` [B, G, C/G, Hp, Wp], in one Gather:
    [B, G, Ho * Wo, K * K, C/G]."""
    B, G, Cg, Hp, Wp = padded.shape
    # [B, G, Hp * Wp, C/G]: a pixel's channels of a group side by side, so that each tap gathers a row of them.
    pixels = padded.reshape(B, G, Cg, Hp * Wp).transpose(2, 3)
    index = _window_index(Ho, Wo, Wp, K, d, s, padded.device)
    return pixels.index_select(2, index).reshape(B, G, Ho * Wo, K * K, Cg)


def _windows_form(
    padded: Tensor, h_attn: Tensor, mul: Tensor | None, add: Tensor | None, K: int, d: int, s: int
) -> Tensor:
    """The sum over each window as one Gather and one batched MatMul: [B, G, C/G, Ho * Wo] out."""
    B, G = padded.shape[:2]
    Ho, Wo = h_attn.shape[3], h_attn.shape[4]
    windows = _gather_windows(padded, Ho, Wo, K, d, s)
    taps = windows if mul is None else windows * mul
    weight = h_attn.reshape(B, G, K * K, Ho * Wo).transpose(2, 3).unsqueeze(3)  # [B, G, Ho * Wo, 1, K*K]
    out = torch.matmul(weight, taps).squeeze(3)  # [B, G, Ho * Wo, C/G]
    if add is not None:
        out = out + (windows * add).sum(3)
    return out.transpose(2, 3)


def _block_weights_index(b: int, K: int, d: int) -> Tensor:
    """Where each entry of a block's weight matrix comes from (a constant: it depends on no size).

    A block of b x b output pixels (stride 1) reads the S x S patch of the padded features that its windows
    cover, S = b + (K - 1) * d. Its weight matrix ``[b * b, S * S]`` holds pixel ``(u, v)``'s attention
    for tap ``(p, q)`` at patch position ``(u + p * d, v + q * d)`` and zero elsewhere.

    Returns:
        Tensor[b * b * S * S] (int64): for each entry, its index in the block's attention flattened as
        ``[b, b, K, K]`` (pixel row and column, tap row and column), or ``b * b * K * K``: a zero appended
        to it.
    """
    S = b + (K - 1) * d
    # Built from aranges rather than by item assignment: an exporter traces whatever runs here, and this is
    # a few nodes on constants (onnxruntime folds them when it loads the file) where thousands of
    # assignments would each become a node.
    u = torch.arange(b).reshape(b, 1, 1, 1)
    v = torch.arange(b).reshape(1, b, 1, 1)
    p = torch.arange(K).reshape(1, 1, K, 1)
    q = torch.arange(K).reshape(1, 1, 1, K)
    position = (((u * b + v) * S + u + p * d) * S + v + q * d).reshape(-1)
    index = torch.full((b * b * S * S,), b * b * K * K, dtype=torch.int64)
    return index.scatter(0, position, torch.arange(b * b * K * K))


def _blocks_form(features: Tensor, h_attn: Tensor, K: int, d: int) -> Tensor:
    """Stride 1, no ghost kernel on the taps, H and W fixed (ints): [B, C, H, W] out.

    The output is cut into blocks of K x K pixels, each of which reads an S x S patch of the padded
    features, S = K + (K - 1) * d. A block's attention is spread into a dense ``[K * K, S * S]`` weight
    matrix over its patch (one Gather whose index depends on K and d only), and one batched MatMul of the
    weights and the gathered patches gives the block. The patches are (S / K)^2 times the features (about
    3.4 for K = 7, d = 1), not K * K times, and each product has K * K rows, not one per pixel.

    The attention and the output are reordered pixel-major (channels last): each move then carries whole
    runs of taps or channels, and the transposes at either end cancel those of a channels-last caller.
    """
    B, C, H, W = features.shape
    G, KK = h_attn.shape[1], h_attn.shape[2]
    Cg, b, r = C // G, K, K // 2 * d
    S = b + (K - 1) * d
    rows, cols = (H + b - 1) // b, (W + b - 1) // b
    # Features, zero-padded for the windows' margin and out to whole blocks; a block's patch is the S x S
    # window of a b-strided grid: [B, G, blocks, S * S, C/G].
    padded = F.pad(features, (r, r + cols * b - W, r, r + rows * b - H))
    patches = _gather_windows(padded.reshape(B, G, Cg, *padded.shape[2:]), rows, cols, S, 1, b)
    # Attention, [B, H, W, G, K*K] -> per block [b, b, K*K] -> weights [b * b, S * S].
    attn = h_attn.permute(0, 3, 4, 1, 2)
    if (rows * b, cols * b) != (H, W):
        attn = F.pad(attn, (0, 0, 0, 0, 0, cols * b - W, 0, rows * b - H))
    attn = attn.reshape(B, rows, b, cols, b, G, KK).permute(0, 5, 1, 3, 2, 4, 6)
    attn = F.pad(attn.reshape(B, G, rows * cols, b * b * KK), (0, 1))  # the zero of the empty entries
    weights = attn.index_select(3, _block_weights_index(b, K, d).to(attn.device))
    out = torch.matmul(weights.reshape(B, G, rows * cols, b * b, S * S), patches)  # [B, G, blocks, b*b, C/G]
    out = out.reshape(B, G, rows, cols, b, b, Cg).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, rows * b, cols * b, C)
    if (rows * b, cols * b) != (H, W):
        out = out[:, :H, :W]
    return out.permute(0, 3, 1, 2)


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
            (``"blocks"`` by default). Default: None.

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
    h = h_attn.to(dtype)

    def per_tap(ghost: Tensor) -> Tensor:  # [C or B*C, K, K] -> [1 or B, G, 1, K*K, C/G]
        return ghost.to(dtype).reshape(-1, G, C // G, K * K).transpose(2, 3).unsqueeze(2)

    mul = per_tap(ghost_mul) if ghost_mul is not None else None
    add_as_conv = ghost_add is not None and ghost_add.dim() == 3
    add = per_tap(ghost_add) if ghost_add is not None and not add_as_conv else None
    fixed_size = isinstance(H, int) and isinstance(W, int)  # an int, not a symbol of a dynamic size
    if form == "blocks" and s == 1 and mul is None and add is None and fixed_size:
        result = _blocks_form(features.to(dtype), h, K, d)
    else:
        # Channels of a group share the attention: [B, G, C/G, Hp, Wp] features against [B, G, K*K, Ho, Wo].
        padded = F.pad(features.to(dtype), (r, r, r, r)).reshape(B, G, C // G, H + 2 * r, W + 2 * r)
        taps = _taps_form if form == "taps" else _windows_form  # blocks' other cases: windows
        result = taps(padded, h, mul, add, K, d, s).reshape(B, C, Ho, Wo)
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
