"""The ELSA-Swin building blocks: the ELSA transformer block, Swin's window block for inputs of any
size, and one stage (patch merging, then blocks).

Shared by the classifier (:mod:`elsa_swin.classifier`) and the dense backbone (:mod:`elsa_mm`), so that
the architecture is written once. Tensors are NHWC, as in timm's Swin.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor

from elsa_op import ELSAAttention


def init_linear(m: nn.Module) -> None:
    """Swin's init of linear layers (truncated normal, zero bias); use with ``module.apply``."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ELSABlock(nn.Module):
    """Pre-norm transformer block with ELSA in place of window attention. x: Tensor[B, H, W, C].

    As in the original ELSA-Swin, q * k is not scaled (qk_scale=1): the attention conv learns the scale.
    Args are those of :class:`elsa_op.ELSAAttention`, plus the MLP's ``mlp_ratio`` and the block's
    ``drop_path`` rate, activation and norm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        qk_scale: float | None = 1.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        elsa_backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ELSAAttention(
            dim,
            num_heads,
            kernel_size=kernel_size,
            group_width=group_width,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            lam=lam,
            gamma=gamma,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=elsa_backend,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PaddedWindowBlock(SwinTransformerBlock):
    """Swin block for feature maps of any size, as in Swin's (and ELSA's) detection backbones: pad to
    whole windows first, then shift, with the shift mask built for the padded map. timm's block shifts
    before padding, which puts the padding elsewhere and gives other outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, always_partition=True, dynamic_mask=True, **kwargs)

    def _attn(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        windows = self.attn(windows, mask=self.get_attn_mask(x) if shifted else None)
        x = window_reverse(windows.view(-1, wh, ww, C), self.window_size, x.shape[1], x.shape[2])
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class ELSASwinStage(nn.Module):
    """Optional 2x patch merging followed by ``depth`` blocks.

    Args:
        dim: input channels. out_dim: channels after merging (and of the blocks).
        input_resolution: (H, W) at the stage input, used by the window-attention blocks.
        depth: number of blocks. downsample: merge patches first.
        num_heads: attention heads.
        use_elsa: ELSA blocks if True, else Swin blocks with (shifted) window attention.
        window_size: Swin window. elsa_kernel, group_width, lam, gamma: see ELSAAttention.
        elsa_backend: the ELSA operator's implementation, ``"kernels"`` or ``"reference"``.
        dense: window-attention blocks for inputs of any size (PaddedWindowBlock), as the detection and
            segmentation backbone needs; otherwise timm's block, whose window adapts to the input resolution.
        drop_path: one rate, or one per block.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
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
        drop_path: list[float] | float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        dense: bool = False,
        elsa_backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.use_elsa = use_elsa
        self.input_resolution = input_resolution
        self.output_resolution = tuple((r + 1) // 2 for r in input_resolution) if downsample else input_resolution
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd) if downsample else nn.Identity()
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        common = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            norm_layer=norm_layer,
            **dd,
        )
        if use_elsa:
            blocks = [
                ELSABlock(
                    out_dim,
                    num_heads,
                    kernel_size=elsa_kernel,
                    group_width=group_width,
                    lam=lam,
                    gamma=gamma,
                    drop_path=rates[i],
                    elsa_backend=elsa_backend,
                    **common,
                )
                for i in range(depth)
            ]
        else:
            block = PaddedWindowBlock if dense else SwinTransformerBlock
            blocks = [
                block(
                    out_dim,
                    self.output_resolution,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    drop_path=rates[i],
                    **common,
                )
                for i in range(depth)
            ]
        self.blocks = nn.Sequential(*blocks)

    def set_input_size(self, feat_size: tuple[int, int], window_size: int) -> None:
        """Adapt the window-attention blocks to a new input resolution (ELSA needs nothing)."""
        self.input_resolution = feat_size
        self.output_resolution = (
            feat_size if isinstance(self.downsample, nn.Identity) else tuple((r + 1) // 2 for r in feat_size)
        )
        if not self.use_elsa:
            for block in self.blocks:
                block.set_input_size(self.output_resolution, (window_size, window_size))

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)
