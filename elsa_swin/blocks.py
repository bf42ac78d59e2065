"""The ELSA-Swin building blocks: the ELSA transformer block, Swin's window block for inputs of any
size, one stage (patch merging, then blocks) and the builder of a model's stages.

Shared by the classifier (:mod:`elsa_swin.classifier`) and the dense backbone (:mod:`elsa_mm`), so that
the architecture is written once. Tensors are NHWC, as in timm's Swin.

The ELSA arguments have one name at every level, the operator's: ``kernel_size`` (the window K of the
ELSA layers) and ``backend`` (``"kernels"`` or ``"reference"``). The stage, the classifier and the
backbone also accept the names they had before, ``elsa_kernel`` (the original code's, in its configs)
and ``elsa_backend`` (:data:`RENAMED_ARGS`).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor

from elsa_op import ELSAAttention

__all__ = [
    "RENAMED_ARGS",
    "ELSABlock",
    "ELSASwinStage",
    "PaddedWindowBlock",
    "accept_renamed_args",
    "build_stages",
    "init_linear",
    "stage_input_resolution",
]

#: Former argument names that the stage, the classifier and the backbone still accept: old -> new.
RENAMED_ARGS = {"elsa_kernel": "kernel_size", "elsa_backend": "backend"}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def accept_renamed_args(init: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let ``init`` (a constructor) take the former names of :data:`RENAMED_ARGS` as keywords.

    Configs and checkpoints of the original code say ``elsa_kernel=``; a call that gives both a former name
    and its new one is refused, since one would silently win.
    """

    @functools.wraps(init)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        for old, new in RENAMED_ARGS.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(
                        f"{init.__qualname__}() got both {new}={kwargs[new]!r} and {old}={kwargs[old]!r}; "
                        f"{old} is the former name of {new}: give only {new}"
                    )
                kwargs[new] = kwargs.pop(old)
        return init(*args, **kwargs)

    return wrapper


def init_linear(m: nn.Module) -> None:
    """Swin's init of linear layers (truncated normal, zero bias); use with ``module.apply``."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ELSABlock(nn.Module):
    """Pre-norm transformer block with ELSA in place of window attention.

    As in the original ELSA-Swin, q * k is not scaled by default (``qk_scale=1``): the attention conv
    learns the scale.

    Args:
        dim (int): channels in and out.
        num_heads (int): attention heads of the ELSA layer.
        kernel_size (int): window size K of the ELSA layer (odd). Default: 7.
        group_width (int): channels per group of the ELSA layer's attention conv. Default: 8.
        lam (float): exponent of the multiplicative ghost kernel; 0 leaves it out. Default: 0.
        gamma (float): scale of the additive ghost kernel; 0 leaves it out. Default: 1.
        qk_scale (float | None): scale of q * k; None means ``head_dim ** -0.5``. Default: 1.
        mlp_ratio (float): hidden width of the MLP over ``dim``. Default: 4.
        qkv_bias (bool): bias of the q/k/v projection. Default: True.
        proj_drop (float): dropout after the attention's projection and in the MLP. Default: 0.
        attn_drop (float): dropout on the attention. Default: 0.
        drop_path (float): stochastic depth rate of both residual branches. Default: 0.
        act_layer (type[nn.Module]): activation of the MLP. Default: nn.GELU.
        norm_layer (type[nn.Module]): norm before the attention and before the MLP. Default: nn.LayerNorm.
        backend (str): the ELSA operator's implementation, ``"kernels"`` or ``"reference"``.
            Default: ``"kernels"``.
        device (torch.device | str | None): where to create the parameters. Default: None.
        dtype (torch.dtype | None): dtype of the parameters. Default: None.

    Shape:
        x: Tensor[B, H, W, C] -> Tensor[B, H, W, C].
    """

    @accept_renamed_args
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
        backend: str = "kernels",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = dict(device=device, dtype=dtype)
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
            backend=backend,
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **dict(kwargs, always_partition=True, dynamic_mask=True))

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
    """One stage: optional 2x patch merging, then ``depth`` ELSA blocks or (shifted) window blocks.

    Args:
        dim (int): input channels.
        out_dim (int): channels after merging, and of the blocks.
        input_resolution (tuple[int, int]): (H, W) at the stage input, used by the window-attention blocks.
        depth (int): number of blocks.
        downsample (bool): merge 2 x 2 patches first.
        num_heads (int): attention heads.
        use_elsa (bool): ELSA blocks if True, else Swin blocks with (shifted) window attention. Default: True.
        window_size (int): window of the Swin blocks. Default: 7.
        kernel_size (int): window size K of the ELSA blocks (former name: ``elsa_kernel``). Default: 7.
        group_width (int): channels per group of ELSA's attention conv. Default: 8.
        lam (float): exponent of ELSA's multiplicative ghost kernel; 0 leaves it out. Default: 0.
        gamma (float): scale of ELSA's additive ghost kernel; 0 leaves it out. Default: 1.
        mlp_ratio (float): hidden width of the MLPs over ``out_dim``. Default: 4.
        qkv_bias (bool): bias of the q/k/v projections. Default: True.
        proj_drop (float): dropout after the projections and in the MLPs. Default: 0.
        attn_drop (float): dropout on the attention. Default: 0.
        drop_path (list[float] | float): stochastic depth rate, one for all blocks or one per block.
            Default: 0.
        norm_layer (type[nn.Module]): norm of the blocks and of the patch merging. Default: nn.LayerNorm.
        dense (bool): window-attention blocks for inputs of any size (:class:`PaddedWindowBlock`), as the
            detection and segmentation backbone needs; otherwise timm's block, whose window adapts to the
            input resolution. Default: False.
        backend (str): the ELSA operator's implementation, ``"kernels"`` or ``"reference"`` (former name:
            ``elsa_backend``). Default: ``"kernels"``.
        device (torch.device | str | None): where to create the parameters. Default: None.
        dtype (torch.dtype | None): dtype of the parameters. Default: None.

    Shape:
        x: Tensor[B, H, W, dim] -> Tensor[B, H', W', out_dim], with H' = ceil(H / 2) after merging.
    """

    @accept_renamed_args
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
        kernel_size: int = 7,
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
        backend: str = "kernels",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = dict(device=device, dtype=dtype)
        self.use_elsa = use_elsa
        self.input_resolution = input_resolution
        self.output_resolution = _merged(input_resolution) if downsample else input_resolution
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd) if downsample else nn.Identity()
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        if len(rates) != depth:
            raise ValueError(f"drop_path needs one rate per block: {depth=} but {len(rates)} rates")
        common: dict[str, Any] = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            norm_layer=norm_layer,
            **dd,
        )
        blocks: list[nn.Module]
        if use_elsa:
            blocks = [
                ELSABlock(
                    out_dim,
                    num_heads,
                    kernel_size=kernel_size,
                    group_width=group_width,
                    lam=lam,
                    gamma=gamma,
                    drop_path=rates[i],
                    backend=backend,
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
        self.output_resolution = feat_size if isinstance(self.downsample, nn.Identity) else _merged(feat_size)
        if not self.use_elsa:
            for block in self.blocks:
                cast(SwinTransformerBlock, block).set_input_size(self.output_resolution, (window_size, window_size))

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _merged(resolution: tuple[int, int]) -> tuple[int, int]:
    return (resolution[0] + 1) // 2, (resolution[1] + 1) // 2


def stage_input_resolution(grid_size: tuple[int, int], index: int) -> tuple[int, int]:
    """(H, W) at the input of stage ``index`` (before its patch merging) for a patch grid of ``grid_size``.

    Stage 0 takes the patch grid; stage i > 0 the output of stage i - 1, halved (rounded up) i - 1 times.
    """
    scale = 2 ** max(index - 1, 0)
    return -(-grid_size[0] // scale), -(-grid_size[1] // scale)


@accept_renamed_args
def build_stages(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    grid_size: tuple[int, int],
    elsa_stages: Sequence[bool] = (True, True, True, False),
    window_size: int = 7,
    kernel_size: int = 7,
    group_width: int = 8,
    lam: float = 0.0,
    gamma: float = 1.0,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    proj_drop: float = 0.0,
    attn_drop: float = 0.0,
    drop_path_rate: float = 0.0,
    norm_layer: type[nn.Module] = nn.LayerNorm,
    dense: bool = False,
    backend: str = "kernels",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """The stages of an ELSA-Swin, as ``nn.Sequential`` (whose children are named ``0, 1, ...``).

    Stage i has ``embed_dim * 2**i`` channels and merges patches first for i > 0. The classifier and the
    dense backbone both build their stages here, so that their parameters have the same names.

    Args:
        embed_dim (int): channels of stage 0 (doubled at each later stage).
        depths (Sequence[int]): blocks per stage.
        num_heads (Sequence[int]): attention heads per stage.
        grid_size (tuple[int, int]): the patch grid (H, W) at the input of stage 0.
        elsa_stages (Sequence[bool]): which stages use ELSA blocks; the others use window attention.
            Default: the first three of four.
        window_size (int): window of the window-attention stages. Default: 7.
        kernel_size (int): window size K of the ELSA stages (former name: ``elsa_kernel``). Default: 7.
        group_width (int): channels per group of ELSA's attention conv. Default: 8.
        lam (float): exponent of ELSA's multiplicative ghost kernel; 0 leaves it out. Default: 0.
        gamma (float): scale of ELSA's additive ghost kernel; 0 leaves it out. Default: 1.
        mlp_ratio (float): hidden width of the MLPs. Default: 4.
        qkv_bias (bool): bias of the q/k/v projections. Default: True.
        proj_drop (float): dropout after the projections and in the MLPs. Default: 0.
        attn_drop (float): dropout on the attention. Default: 0.
        drop_path_rate (float): stochastic depth of the last block, rising linearly from 0 at the first.
            Default: 0.
        norm_layer (type[nn.Module]): norm of the blocks and patch merging. Default: nn.LayerNorm.
        dense (bool): window-attention blocks for inputs of any size (see :class:`ELSASwinStage`).
            Default: False.
        backend (str): the ELSA operator's implementation (former name: ``elsa_backend``).
            Default: ``"kernels"``.
        device (torch.device | str | None): where to create the parameters. Default: None.
        dtype (torch.dtype | None): dtype of the parameters. Default: None.

    Returns:
        nn.Sequential: the ``len(depths)`` :class:`ELSASwinStage` modules.

    Raises:
        ValueError: ``depths``, ``num_heads`` and ``elsa_stages`` of different lengths.
    """
    if not len(depths) == len(num_heads) == len(elsa_stages):
        raise ValueError(
            "depths, num_heads and elsa_stages need one entry per stage: "
            f"depths={tuple(depths)} num_heads={tuple(num_heads)} elsa_stages={tuple(elsa_stages)}"
        )
    rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per block, by stage
    stages = []
    for i, depth in enumerate(depths):
        stages.append(
            ELSASwinStage(
                dim=embed_dim * 2 ** max(i - 1, 0),
                out_dim=embed_dim * 2**i,
                input_resolution=stage_input_resolution(grid_size, i),
                depth=depth,
                downsample=i > 0,
                num_heads=num_heads[i],
                use_elsa=bool(elsa_stages[i]),
                window_size=window_size,
                kernel_size=kernel_size,
                group_width=group_width,
                lam=lam,
                gamma=gamma,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
                norm_layer=norm_layer,
                dense=dense,
                backend=backend,
                device=device,
                dtype=dtype,
            )
        )
    return nn.Sequential(*stages)
