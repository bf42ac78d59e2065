"""ELSA-Swin classifiers for timm: Swin Transformer with ELSA in stages 1-3.

Importing this module (or the ``elsa_swin`` package) registers ``elsa_swin_tiny/small/base`` (and the small ``elsa_swin_nano`` used by
the demo and tests) with timm, so ``timm.create_model('elsa_swin_tiny', ...)`` works.

Published checkpoints of the original code load through :func:`checkpoint_filter_fn`, which maps its
names (downsampling at the end of a stage, ``attn.pre_proj``/``post_proj``/``rb`` in the window
attention, the packed ghost kernels, ``head.``) onto timm's layout.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .blocks import ELSASwinStage, init_linear
from .checkpoint import map_original_names, unwrap_state_dict

__all__ = ["ELSASwinTransformer", "checkpoint_filter_fn"]


class ELSASwinTransformer(nn.Module):
    """Swin Transformer whose stages listed in ``elsa_stages`` use ELSA blocks instead of window attention.

    Args:
        img_size: input size the window-attention stages are built for (other sizes work, see
            ``set_input_size``). patch_size, in_chans, num_classes, global_pool: as in timm's Swin.
        embed_dim: channels of stage 1 (doubled at each later stage). depths, num_heads: per stage.
        window_size: window of the Swin stages. elsa_kernel: K of the ELSA stages.
        group_width: channels per group of ELSA's attention conv. lam, gamma: ghost head (see ELSAAttention).
        elsa_stages: which stages use ELSA. Default: the first three.
        mlp_ratio, qkv_bias, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: as in timm's Swin.
        elsa_backend: the ELSA operator's implementation, ``"kernels"`` (compiled) or ``"reference"``
            (pure PyTorch). Default: ``"kernels"``.
        device, dtype: where and in which dtype to create the parameters, as for every timm model.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        elsa_kernel: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        elsa_stages: Sequence[bool] = (True, True, True, False),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type = nn.LayerNorm,
        elsa_backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if len(depths) != len(num_heads) or len(depths) != len(elsa_stages):
            raise ValueError(
                f"depths, num_heads and elsa_stages need one entry per stage: {depths=} {num_heads=} {elsa_stages=}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.feature_info = []

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            strict_img_size=False,
            output_fmt="NHWC",
            **dd,
        )
        grid = self.patch_embed.grid_size
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per block, grouped by stage
        layers = []
        in_dim = embed_dim
        for i in range(self.num_layers):
            out_dim = embed_dim * 2**i
            scale = 2 ** max(i - 1, 0)
            layers.append(
                ELSASwinStage(
                    dim=in_dim,
                    out_dim=out_dim,
                    input_resolution=((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale),
                    depth=depths[i],
                    downsample=i > 0,
                    num_heads=num_heads[i],
                    use_elsa=elsa_stages[i],
                    window_size=window_size,
                    elsa_kernel=elsa_kernel,
                    group_width=group_width,
                    lam=lam,
                    gamma=gamma,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    elsa_backend=elsa_backend,
                    **dd,
                )
            )
            in_dim = out_dim
            self.feature_info.append(dict(num_chs=out_dim, reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        self.apply(init_linear)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild the window-attention masks for another input size (e.g. fine-tuning at 384)."""
        self.patch_embed.set_input_size(img_size=img_size)
        grid = self.patch_embed.grid_size
        for i, stage in enumerate(self.layers):
            scale = 2 ** max(i - 1, 0)
            stage.set_input_size(((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale), self.window_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {
            n
            for n, _ in self.named_parameters()
            if n.endswith(("relative_position_bias_table", "ghost_mul", "ghost_add"))
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW) for the stages in ``indices`` (last n if int, all if None)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.layers):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: ELSASwinTransformer) -> dict[str, torch.Tensor]:
    """Map a checkpoint of the original ELSA code (or of ours, unchanged) onto :class:`ELSASwinTransformer`."""
    state_dict = unwrap_state_dict(state_dict)
    if "layers.0.downsample.reduction.weight" in state_dict:  # the original's layout
        state_dict = {re.sub(r"^head\.", "head.fc.", k): v for k, v in state_dict.items()}
    return map_original_names(state_dict, model)


def _create_elsa_swin(variant: str, pretrained: bool = False, **kwargs) -> ELSASwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(
        ELSASwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2112.12786",
        **kwargs,
    }


# The published weights live on Google Drive / Baidu (see README); load them with --checkpoint or
# --initial-checkpoint, which go through checkpoint_filter_fn.
default_cfgs = generate_default_cfgs(
    {
        "elsa_swin_nano.untrained": _cfg(),
        "elsa_swin_tiny.in1k": _cfg(),
        "elsa_swin_small.in1k": _cfg(),
        "elsa_swin_base.in1k": _cfg(),
    }
)


@register_model
def elsa_swin_nano(pretrained: bool = False, **kwargs) -> ELSASwinTransformer:
    """A narrow ELSA-Swin (embed 32, depths 2-2-2-2) for demos and tests; not a published model."""
    args = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4)
    return _create_elsa_swin("elsa_swin_nano", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_tiny(pretrained: bool = False, **kwargs) -> ELSASwinTransformer:
    """ELSA-Swin-T, 29M parameters, 82.7% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_width=4)
    return _create_elsa_swin("elsa_swin_tiny", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_small(pretrained: bool = False, **kwargs) -> ELSASwinTransformer:
    """ELSA-Swin-S, 53M parameters, 83.5% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_elsa_swin("elsa_swin_small", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_base(pretrained: bool = False, **kwargs) -> ELSASwinTransformer:
    """ELSA-Swin-B, 93M parameters, 84.0% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_elsa_swin("elsa_swin_base", pretrained=pretrained, **dict(args, **kwargs))
