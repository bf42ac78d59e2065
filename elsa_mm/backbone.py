"""ELSA-Swin dense backbone: four NCHW feature maps, each with its own LayerNorm, for inputs of any size.

Registered in mmengine's root ``MODELS`` registry, which mmdet's and mmseg's registries search too.
"""

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import PatchEmbed

from elsa_swin.blocks import ELSASwinStage, accept_renamed_args, build_stages, init_linear
from elsa_swin.checkpoint import load_checkpoint_file, map_original_names, unwrap_state_dict

from .compat import mmengine_safe_globals


@MODELS.register_module()
class ELSASwin(BaseModule):
    """ELSA-Swin backbone (ELSA in stages 1-3, shifted-window attention in stage 4).

    Args:
        pretrain_img_size (int): image size of the classification pre-training (sets the stages' nominal
            resolution; inputs of any size work, padded inside to the patch and window sizes). Default: 224.
        patch_size (int): patch size of the embedding. Default: 4.
        in_channels (int): input channels. Default: 3.
        embed_dim (int): channels of stage 1, doubled at each later stage. Default: 96.
        depths (Sequence[int]): blocks per stage. Default: (2, 2, 6, 2).
        num_heads (Sequence[int]): attention heads per stage. Default: (3, 6, 12, 24).
        window_size (int): window of the window-attention stages. Default: 7.
        mlp_ratio (float): hidden width of the MLPs. Default: 4.
        qkv_bias (bool): bias of the q/k/v projections. Default: True.
        drop_rate (float): dropout after the patch embedding, after the projections and in the MLPs.
            Default: 0.
        attn_drop_rate (float): dropout on the attention. Default: 0.
        drop_path_rate (float): stochastic depth of the last block, rising linearly from 0. Default: 0.2.
        kernel_size (int): window size K of the ELSA stages (former name: ``elsa_kernel``, the original's
            configs use it). Default: 7.
        group_width (int): channels per group of ELSA's attention conv. Default: 8.
        lam (float): exponent of ELSA's multiplicative ghost kernel; 0 leaves it out. Default: 0.
        gamma (float): scale of ELSA's additive ghost kernel; 0 leaves it out. Default: 1.
        elsa_stages (Sequence[bool] | None): which stages use ELSA; None means all but the last.
            Default: None.
        backend (str): the ELSA operator's implementation, ``"kernels"`` or ``"reference"`` (former name:
            ``elsa_backend``). Default: ``"kernels"``.
        out_indices (Sequence[int]): stages whose outputs are returned, each after its own LayerNorm
            ``norm{i}``. Default: (0, 1, 2, 3).
        frozen_stages (int): freeze the patch embedding (>= 0) and the first ``frozen_stages`` stages with
            their norms; -1 freezes nothing. Default: -1.
        use_checkpoint (bool): gradient checkpointing of every stage. Default: False.
        pretrained (str | None): path of a classification checkpoint (deprecated form of ``init_cfg``).
            Default: None.
        init_cfg (dict | None): ``dict(type='Pretrained', checkpoint=PATH)`` loads a classification
            checkpoint, ours or the original's (also with a ``backbone.`` prefix), and logs missing and
            unexpected keys. Default: None.
    """

    @accept_renamed_args
    def __init__(
        self,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_channels: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        kernel_size: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        elsa_stages: Sequence[bool] | None = None,
        backend: str = "kernels",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
        pretrained: str | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("give either pretrained or init_cfg, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        num_stages = len(depths)
        if not all(0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must lie in [0, {num_stages})")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must lie in [-1, {num_stages}], got {frozen_stages}")
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(
            img_size=pretrain_img_size,
            patch_size=patch_size,
            in_chans=in_channels,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
            dynamic_img_pad=True,
            output_fmt="NHWC",
        )
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = build_stages(
            embed_dim,
            depths,
            num_heads,
            self.patch_embed.grid_size,
            elsa_stages=[i < num_stages - 1 for i in range(num_stages)] if elsa_stages is None else elsa_stages,
            window_size=window_size,
            kernel_size=kernel_size,
            group_width=group_width,
            lam=lam,
            gamma=gamma,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=drop_rate,
            attn_drop=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            dense=True,
            backend=backend,
        )
        for stage in self.layers:
            cast(ELSASwinStage, stage).grad_checkpointing = use_checkpoint
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(init_linear)
        self._freeze_stages()
        # The original's checkpoints (classification ones, and the published COCO / ADE20K models, which
        # hold the backbone under "backbone.") load through the name mapping, whoever loads them:
        # our init_cfg, mmengine's load_from, or a plain load_state_dict.
        self.register_load_state_dict_pre_hook(_map_original_names_hook)

    def init_weights(self) -> None:
        """Load ``init_cfg``'s pretrained classification checkpoint; other init is done at construction."""
        if not (self.init_cfg and self.init_cfg.get("type") == "Pretrained"):
            return
        self.load_pretrained(self.init_cfg["checkpoint"])

    def load_pretrained(self, path: str) -> tuple[list[str], list[str]]:
        """Load a classification checkpoint; returns (missing keys, unexpected keys), which are also logged."""
        checkpoint = load_checkpoint_file(path, extra_safe_globals=mmengine_safe_globals())
        state_dict = unwrap_state_dict(checkpoint)
        if any(k.startswith("backbone.") for k in state_dict):  # a detector's or segmentor's checkpoint
            state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        # The classifier's final norm and head have no place in the backbone.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "norm."))}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        print_log(
            f"loaded {path}: missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}", logger="current"
        )
        return missing, unexpected

    def _freeze_stages(self) -> None:
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(max(self.frozen_stages, 0)):
            frozen.append(self.layers[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f"norm{i}"))
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "ELSASwin":
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> tuple:
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


def _map_original_names_hook(module: ELSASwin, state_dict: dict, prefix: str, *args: Any) -> None:
    own = {k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    state_dict.update({prefix + k: v for k, v in map_original_names(own, module).items()})
