"""Pure-PyTorch ELSA operator: the definition the kernels are tested against.

It materialises every shifted copy of the input, so it is slow and memory-hungry; use it for tests
and as the "unfold path" baseline of the benchmarks, never in a model.
"""

import torch.nn.functional as F
from torch import Tensor


def elsa_reference(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None = None,
    ghost_add: Tensor | None = None,
    *,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
) -> Tensor:
    """Same contract as :func:`elsa_op.elsa_function`, computed with ``F.unfold``."""
    B, C, H, W = features.shape
    K = kernel_size
    if h_attn.dim() == 4:
        h_attn = h_attn.unsqueeze(1)
    G = h_attn.shape[1]
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    cols = F.unfold(features, K, dilation=dilation, padding=K // 2 * dilation, stride=stride)
    cols = cols.view(B, G, C // G, K * K, Ho, Wo)
    weight = h_attn.view(B, G, 1, K * K, Ho, Wo)
    if ghost_mul is not None:
        weight = weight * ghost_mul.reshape(-1, G, C // G, K * K, 1, 1)
    if ghost_add is not None:
        weight = weight + ghost_add.reshape(-1, G, C // G, K * K, 1, 1)
    # (float32 ghost kernels beside half or bfloat16 features: the result takes the features' dtype)
    return (cols * weight).sum(3).reshape(B, C, Ho, Wo).to(features.dtype)
