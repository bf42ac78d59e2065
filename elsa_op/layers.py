"""The ELSA attention layer and transformer block (NHWC in, NHWC out, like timm's Swin blocks)."""
from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor

from .ops import elsa_function


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
        lam: exponent of the multiplicative ghost kernel; 0 disables it. Default: 0.
        gamma: scale of the additive ghost kernel; 0 disables it. Default: 1.
        attn_drop: dropout on the attention. proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        group_width: int = 8,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        lam: float = 0.0,
        gamma: float = 1.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        # q and k get about 2/3 of the channels, rounded up to whole groups of the attention conv.
        self.dim_qk = -(-(dim // 3 * 2) // group_width) * group_width
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.lam = lam
        self.gamma = gamma
        self.scale = qk_scale or (dim // num_heads) ** -0.5

        self.pre_proj = nn.Conv2d(dim, self.dim_qk * 2 + dim, 1, bias=qkv_bias)
        self.attn = nn.Sequential(
            nn.Conv2d(
                self.dim_qk, self.dim_qk, kernel_size, padding=kernel_size // 2 * dilation,
                dilation=dilation, groups=self.dim_qk // group_width,
            ),
            nn.GELU(),
            nn.Conv2d(self.dim_qk, kernel_size * kernel_size * num_heads, 1),
        )
        # The published checkpoints store the ghost kernels in one tensor whose shape depends on which
        # of them are enabled: (2, 1, C, K, K) for both, (1, C, K, K) for one, none for neither.
        ghost_shape = (1, dim, kernel_size, kernel_size)
        if lam != 0 and gamma != 0:
            self.ghost_head = nn.Parameter(torch.zeros(2, *ghost_shape))
        elif lam != 0 or gamma != 0:
            self.ghost_head = nn.Parameter(torch.zeros(*ghost_shape))
        else:
            self.register_parameter("ghost_head", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.post_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_ghost_head()

    def reset_ghost_head(self) -> None:
        if self.ghost_head is None:
            return
        with torch.no_grad():
            if self.lam != 0 and self.gamma != 0:
                self.ghost_head[0].normal_()
                trunc_normal_(self.ghost_head[1], std=0.02)
            elif self.lam != 0:
                self.ghost_head.normal_()
            else:
                trunc_normal_(self.ghost_head, std=0.02)

    def _ghost_kernels(self):
        """(ghost_mul, ghost_add) of shape (C, K, K), lam and gamma applied; None where disabled."""
        if self.ghost_head is None:
            return None, None
        if self.lam != 0 and self.gamma != 0:
            return self.ghost_head[0, 0] ** self.lam, self.ghost_head[1, 0] * self.gamma
        if self.lam != 0:
            return self.ghost_head[0] ** self.lam, None
        return None, self.ghost_head[0] * self.gamma

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
        ghost_mul, ghost_add = self._ghost_kernels()
        x = elsa_function(v, attn, ghost_mul, ghost_add, kernel_size=K, dilation=self.dilation)
        x = self.post_proj(x.permute(0, 2, 3, 1))
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, lam={self.lam}, gamma={self.gamma}"
        )


class ELSABlock(nn.Module):
    """Pre-norm transformer block with ELSA in place of window attention. x: Tensor[B, H, W, C].

    As in the original ELSA-Swin, q * k is not scaled (qk_scale=1): the attention conv learns the scale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        qk_scale: Optional[float] = 1.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ELSAAttention(
            dim, num_heads, kernel_size=kernel_size, group_width=group_width, qkv_bias=qkv_bias,
            qk_scale=qk_scale, lam=lam, gamma=gamma, attn_drop=attn_drop, proj_drop=proj_drop,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
