"""The ELSA attention layer (NHWC in, NHWC out, like timm's Swin blocks). Needs torch only."""

import torch
import torch.nn as nn
from torch import Tensor

from .ops import BACKENDS, elsa_function

# FX tracing (timm's feature_cls="fx", torchvision's create_feature_extractor) keeps the operator as one
# call node instead of tracing into its argument checks.
torch.fx.wrap("elsa_function")


class ELSAAttention(nn.Module):
    """Enhanced local self-attention: Hadamard attention plus a ghost head.

    q, k, v come from a 1x1 conv; the attention of each pixel over its K x K neighbourhood is produced
    from the Hadamard product q * k * scale by a grouped K x K conv, GELU and a 1x1 conv to
    ``num_heads * K * K`` logits, softmaxed over the K * K taps. The ghost head adds static per-channel
    kernels to it: ``weight = ghost_mul ** lam * attention + ghost_add * gamma``, and the weighted sum of v
    over the window is taken by :func:`elsa_op.elsa_function`.

    Args:
        dim: channels in and out.
        num_heads: attention heads; each head's attention is shared by ``dim // num_heads`` channels.
        kernel_size: window size K (odd). Default: 7.
        dilation: window dilation. Default: 1.
        group_width: channels per group of the K x K conv that makes the attention. Default: 8.
        qkv_bias: bias of the q/k/v projection. Default: True.
        qk_scale: scale of q * k; None means ``(dim // num_heads) ** -0.5``.
        lam: exponent of the multiplicative ghost kernel ``ghost_mul`` (Tensor[C, K, K]); 0 leaves it out.
            Default: 0.
        gamma: scale of the additive ghost kernel ``ghost_add`` (Tensor[C, K, K]); 0 leaves it out.
            Default: 1.
        attn_drop: dropout on the attention. proj_drop: dropout after the output projection.
        backend: ``"kernels"`` (the compiled operator) or ``"reference"`` (pure PyTorch, slow; for
            checking and for machines without the compiled library). Default: ``"kernels"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        group_width: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        lam: float = 0.0,
        gamma: float = 1.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_heads = num_heads
        # q and k get about 2/3 of the channels, rounded up to whole groups of the attention conv.
        self.dim_qk = -(-(dim // 3 * 2) // group_width) * group_width
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.lam = lam
        self.gamma = gamma
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.backend = backend

        self.pre_proj = nn.Conv2d(dim, self.dim_qk * 2 + dim, 1, bias=qkv_bias, **dd)
        self.attn = nn.Sequential(
            nn.Conv2d(
                self.dim_qk,
                self.dim_qk,
                kernel_size,
                padding=kernel_size // 2 * dilation,
                dilation=dilation,
                groups=self.dim_qk // group_width,
                **dd,
            ),
            nn.GELU(),
            nn.Conv2d(self.dim_qk, kernel_size * kernel_size * num_heads, 1, **dd),
        )
        shape = (dim, kernel_size, kernel_size)
        self.ghost_mul = nn.Parameter(torch.empty(shape, **dd)) if lam != 0 else None
        self.ghost_add = nn.Parameter(torch.empty(shape, **dd)) if gamma != 0 else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.post_proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_ghost_kernels()

    def reset_ghost_kernels(self) -> None:
        """The original's init: ``ghost_mul`` standard normal, ``ghost_add`` truncated normal (std 0.02)."""
        if self.ghost_mul is not None:
            nn.init.normal_(self.ghost_mul)
        if self.ghost_add is not None:
            nn.init.trunc_normal_(self.ghost_add, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, H, W, C] -> Tensor[B, H, W, C]."""
        B, H, W, C = x.shape
        K = self.kernel_size
        # NHWC memory throughout, seen as NCHW: the convolutions run channels-last, the softmax runs over
        # the last dimension, and elsa_function reads v and the attention in place and returns
        # channels-last output that post_proj takes without a copy.
        q, k, v = self.pre_proj(x.permute(0, 3, 1, 2)).split((self.dim_qk, self.dim_qk, C), dim=1)
        # ELSA-Swin's blocks use scale 1 (the attention conv learns it): skip a pass over q * k there.
        qk = q * k if self.scale == 1 else q * k * self.scale
        logits = self.attn(qk).permute(0, 2, 3, 1).reshape(B, H, W, self.num_heads, K * K)
        attn = self.attn_drop(logits.softmax(dim=-1)).permute(0, 3, 4, 1, 2)
        ghost_mul = self.ghost_mul**self.lam if self.ghost_mul is not None else None
        ghost_add = self.ghost_add * self.gamma if self.ghost_add is not None else None
        if torch.jit.is_scripting():
            # TorchScript calls the registered operator directly (elsa_function's checks are Python only;
            # the arguments made here always pass them).
            ghost_mul = ghost_mul.to(v.dtype) if ghost_mul is not None else None
            ghost_add = ghost_add.to(v.dtype) if ghost_add is not None else None
            x = torch.ops.elsa_op.elsa_forward(v, attn, ghost_mul, ghost_add, K, self.dilation, 1)
        else:
            x = elsa_function(
                v, attn, ghost_mul, ghost_add, kernel_size=K, dilation=self.dilation, backend=self.backend
            )
        x = self.post_proj(x.permute(0, 2, 3, 1))
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, lam={self.lam}, gamma={self.gamma}, backend={self.backend!r}"
        )
