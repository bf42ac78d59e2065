"""The ELSA operator's public functional API: :func:`elsa_function` and the backends it can run on.

The operator itself is ``torch.ops.elsa_op.elsa_forward`` (registered by the compiled ``elsa_op._C``,
with its fake kernels and autograd formula in :mod:`elsa_op._registration`). :func:`elsa_function` is the
way to call it from Python: it checks the arguments, applies autocast and chooses the backend.
"""

import torch
from torch import Tensor

from .checks import check_elsa_args, ghost_accumulation_dtype
from .decomposition import elsa_forward_decomposition
from .reference import elsa_reference

__all__ = ["BACKENDS", "elsa_function"]

#: The implementations ``elsa_function(..., backend=...)`` accepts.
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
    """Local attention with per-pixel Hadamard attention and ghost kernels (the ELSA operator).

    Each output pixel is the weighted sum of the K x K window of features around it, zero-padded::

        out[b, c, i, j] = sum_{p, q < K} x[b, c, i*s + (p - K//2)*d, j*s + (q - K//2)*d]
                          * (m[c, p, q] * h[b, c // (C/G), p*K + q, i, j] + a[c, p, q])

    Args:
        features (Tensor[B, C, H, W]): the values ``x``, contiguous or channels-last.
        h_attn (Tensor[B, G, K*K, Ho, Wo] or Tensor[B, K*K, Ho, Wo]): attention ``h`` per output pixel,
            shared by the C/G channels of each of the G groups; 4-D means G = 1.
        ghost_mul (Tensor[C, K, K] or Tensor[B, C, K, K], optional): multiplicative ghost kernel ``m``. A 3-D
            kernel is broadcast over the batch (and its gradient summed over it). Default: None (``m = 1``).
        ghost_add (Tensor[C, K, K] or Tensor[B, C, K, K], optional): additive ghost kernel ``a``.
            Default: None (``a = 0``).
        kernel_size (int): window size K, odd. Keyword-only, required.
        dilation (int): spacing ``d`` of the window taps. Default: 1.
        stride (int): output stride ``s``; ``Ho = (H - 1) // s + 1``, ``Wo = (W - 1) // s + 1``. Default: 1.
        backend (str): ``"kernels"``, the compiled operator, or ``"reference"``, the pure-PyTorch
            definition (:func:`elsa_op.elsa_reference`: slow and memory-hungry, for checking).
            Default: ``"kernels"``.

    Returns:
        Tensor[B, C, Ho, Wo]: in the features' dtype and memory layout. Under ``torch.autocast`` the
        features and the attention are cast to the autocast dtype, as a convolution's inputs are, and the
        ghost kernels to float32: they are C*K*K values whose gradients sum a product over every pixel of
        the batch, so they and their gradients stay float32. Outside autocast, ghost kernels take the
        features' dtype or, beside half or bfloat16 features, float32.

    Raises:
        ValueError: an unknown ``backend``; shapes that do not fit together (the message shows them); a
            non-positive or even ``kernel_size``; a non-positive ``dilation`` or ``stride``; tensors on
            different devices.
        TypeError: a non-tensor or non-floating input, dtypes that differ, a non-int size.
        RuntimeError: CUDA tensors while ``elsa_op._C`` was built without CUDA kernels.

    Examples:
        >>> import torch
        >>> from elsa_op import elsa_function, elsa_reference
        >>> x = torch.randn(2, 8, 14, 14)  # features [B, C, H, W]
        >>> h = torch.randn(2, 2, 9, 14, 14).softmax(dim=2)  # G = 2 groups, 3 x 3 window
        >>> a = 0.02 * torch.randn(8, 3, 3)  # additive ghost kernel [C, K, K]
        >>> out = elsa_function(x, h, ghost_add=a, kernel_size=3)
        >>> out.shape
        torch.Size([2, 8, 14, 14])
        >>> torch.allclose(out, elsa_reference(x, h, ghost_add=a, kernel_size=3), atol=1e-5)
        True
        >>> elsa_function(x, h, ghost_add=a, kernel_size=3, stride=2).shape  # h must fit the output size
        Traceback (most recent call last):
        ...
        ValueError: h_attn must have shape [2, 2, 9, 7, 7] for features of shape [2, 8, 14, 14], kernel_size=3 and stride=2; got h_attn.shape=torch.Size([2, 2, 9, 14, 14])
    """  # noqa: E501
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
    if torch.onnx.is_in_onnx_export():
        # ONNX has no ELSA operator: the exporter records the op written in standard ones.
        return elsa_forward_decomposition(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
    return torch.ops.elsa_op.elsa_forward(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
