"""One ELSA-Swin stage: patch merging, then ELSA blocks or Swin window-attention blocks.

Shared by the classifier (cls/models/elsa_swin.py) and the dense backbone, so that the architecture
is written once. Tensors are NHWC, as in timm's Swin.
"""
from typing import List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor

from .layers import ELSABlock


class ELSASwinStage(nn.Module):
    """Optional 2x patch merging followed by ``depth`` blocks.

    Args:
        dim: input channels. out_dim: channels after merging (and of the blocks).
        input_resolution: (H, W) at the stage input, used by the window-attention blocks.
        depth: number of blocks. downsample: merge patches first.
        num_heads: attention heads.
        use_elsa: ELSA blocks if True, else Swin blocks with (shifted) window attention.
        window_size: Swin window. elsa_kernel, group_width, lam, gamma: see ELSAAttention.
        always_partition, dynamic_mask: passed to timm's SwinTransformerBlock (dense inputs of any size).
        drop_path: one rate, or one per block.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        downsample: bool,
        num_heads: int,
        use_elsa: bool = True,
        window_size: int = 7,
        elsa_kernel: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[List[float], float] = 0.0,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        always_partition: bool = False,
        dynamic_mask: bool = False,
    ):
        super().__init__()
        self.use_elsa = use_elsa
        self.input_resolution = input_resolution
        self.output_resolution = tuple((r + 1) // 2 for r in input_resolution) if downsample else input_resolution
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer) if downsample else nn.Identity()
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, norm_layer=norm_layer)
        if use_elsa:
            blocks = [
                ELSABlock(out_dim, num_heads, kernel_size=elsa_kernel, group_width=group_width, lam=lam, gamma=gamma,
                          drop_path=rates[i], **common)
                for i in range(depth)
            ]
        else:
            blocks = [
                SwinTransformerBlock(
                    out_dim, self.output_resolution, num_heads=num_heads, window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2, always_partition=always_partition,
                    dynamic_mask=dynamic_mask, drop_path=rates[i], **common,
                )
                for i in range(depth)
            ]
        self.blocks = nn.Sequential(*blocks)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: int, always_partition: Optional[bool] = None) -> None:
        """Adapt the window-attention blocks to a new input resolution (ELSA needs nothing)."""
        self.input_resolution = feat_size
        self.output_resolution = feat_size if isinstance(self.downsample, nn.Identity) else tuple((r + 1) // 2 for r in feat_size)
        if not self.use_elsa:
            for block in self.blocks:
                block.set_input_size(self.output_resolution, (window_size, window_size), always_partition)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

