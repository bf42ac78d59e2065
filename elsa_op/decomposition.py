"""How the ELSA operator is written in standard operators, for exporters (ONNX).

``torch.onnx.export(model, x, path, dynamo=True)`` keeps custom operators as they are unless a
decomposition for them exists; this module registers one in torch's decomposition table (which the ONNX
exporter consults, and which eager execution, autograd and ``torch.compile`` do not use), so that plain
exports of our models work once ``elsa_op`` is imported. The decomposition gathers the K * K taps of every
output pixel from the zero-padded features with one index, weights them and sums: pad, gather, mul, add,
reduce-sum.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._decomp import register_decomposition


@register_decomposition(torch.ops.elsa_op.elsa_forward.default)
def elsa_forward_decomposition(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    """``elsa_op::elsa_forward`` (features [B, C, H, W], h_attn [B, G, K*K, Ho, Wo], ghost kernels
    [C, K, K] or [B, C, K, K]) in pad / slice / mul / add."""
    B, C, H, W = features.shape
    G, Ho, Wo = h_attn.shape[1], h_attn.shape[3], h_attn.shape[4]
    K, d, s = kernel_size, dilation, stride
    r = K // 2 * d
    Wp = W + 2 * r
    # Flat positions in the padded plane of every tap of every output pixel: [K, K, Ho, Wo].
    taps = torch.arange(K, device=features.device) * d
    rows = taps[:, None, None, None] + (torch.arange(Ho, device=features.device) * s)[None, None, :, None]
    cols = taps[None, :, None, None] + (torch.arange(Wo, device=features.device) * s)[None, None, None, :]
    index = (rows * Wp + cols).reshape(-1)
    x = F.pad(features, (r, r, r, r)).reshape(B, G, C // G, -1)
    windows = x.index_select(3, index).reshape(B, G, C // G, K * K, Ho, Wo)
    weight = h_attn.unsqueeze(2)  # [B, G, 1, K*K, Ho, Wo]: shared by the channels of a group
    if ghost_mul is not None:
        weight = weight * ghost_mul.reshape(-1, G, C // G, K * K, 1, 1)
    if ghost_add is not None:
        weight = weight + ghost_add.reshape(-1, G, C // G, K * K, 1, 1)
    return (windows * weight).sum(3).reshape(B, C, Ho, Wo).to(features.dtype)
