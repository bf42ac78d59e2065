"""ELSA-Swin classifiers for timm: Swin Transformer with ELSA in stages 1-3.

Importing this module (or the ``elsa_swin`` package) registers ``elsa_swin_tiny/small/base`` (and the small ``elsa_swin_nano`` used by
the demo and tests) with timm, so ``timm.create_model('elsa_swin_tiny', ...)`` works.

Published checkpoints of the original code load through :func:`checkpoint_filter_fn`, which maps its
names (downsampling at the end of a stage, ``attn.pre_proj``/``post_proj``/``rb`` in the window
attention, the packed ghost kernels, ``head.``) onto timm's layout.
"""

import logging
import re
from collections.abc import Sequence
from typing import Any, cast

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .blocks import ELSASwinStage, accept_renamed_args, build_stages, init_linear, stage_input_resolution
from .checkpoint import CheckpointError, head_classes, map_original_names, unwrap_state_dict

__all__ = ["ELSASwinTransformer", "checkpoint_filter_fn", "create_from_checkpoint", "load_weights"]

_logger = logging.getLogger(__name__)


class ELSASwinTransformer(nn.Module):
    """Swin Transformer whose stages listed in ``elsa_stages`` use ELSA blocks instead of window attention.

    Args:
        img_size (int | tuple[int, int]): input size the window-attention stages are built for (other
            sizes work, see :meth:`set_input_size`). Default: 224.
        patch_size (int): patch size of the embedding. Default: 4.
        in_chans (int): input channels. Default: 3.
        num_classes (int): classes of the head; 0 for no head. Default: 1000.
        global_pool (str): pooling before the head, ``"avg"`` or ``""``. Default: ``"avg"``.
        embed_dim (int): channels of stage 1, doubled at each later stage. Default: 96.
        depths (Sequence[int]): blocks per stage. Default: (2, 2, 6, 2).
        num_heads (Sequence[int]): attention heads per stage. Default: (3, 6, 12, 24).
        window_size (int): window of the window-attention stages. Default: 7.
        kernel_size (int): window size K of the ELSA stages (former name: ``elsa_kernel``). Default: 7.
        group_width (int): channels per group of ELSA's attention conv. Default: 8.
        lam (float): exponent of ELSA's multiplicative ghost kernel; 0 leaves it out. Default: 0.
        gamma (float): scale of ELSA's additive ghost kernel; 0 leaves it out. Default: 1.
        elsa_stages (Sequence[bool]): which stages use ELSA. Default: the first three of four.
        mlp_ratio (float): hidden width of the MLPs. Default: 4.
        qkv_bias (bool): bias of the q/k/v projections. Default: True.
        drop_rate (float): dropout before the classifier. Default: 0.
        pos_drop_rate (float): dropout after the patch embedding (the original's ``drop_rate``, with
            ``proj_drop_rate`` the same value). Default: 0.
        proj_drop_rate (float): dropout after the projections and in the MLPs. Default: 0.
        attn_drop_rate (float): dropout on the attention. Default: 0.
        drop_path_rate (float): stochastic depth of the last block, rising linearly from 0. Default: 0.1.
        norm_layer (type[nn.Module]): norm layer. Default: nn.LayerNorm.
        backend (str): the ELSA operator's implementation, ``"kernels"`` (compiled) or ``"reference"``
            (pure PyTorch) (former name: ``elsa_backend``). Default: ``"kernels"``.
        device (torch.device | str | None): where to create the parameters, as for every timm model.
            Default: None.
        dtype (torch.dtype | None): dtype of the parameters. Default: None.
    """

    @accept_renamed_args
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
        kernel_size: int = 7,
        group_width: int = 8,
        lam: float = 0.0,
        gamma: float = 1.0,
        elsa_stages: Sequence[bool] = (True, True, True, False),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        backend: str = "kernels",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.feature_info = [
            dict(num_chs=embed_dim * 2**i, reduction=patch_size * 2**i, module=f"layers.{i}")
            for i in range(self.num_layers)
        ]

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
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.layers = build_stages(
            embed_dim,
            depths,
            num_heads,
            self.patch_embed.grid_size,
            elsa_stages=elsa_stages,
            window_size=window_size,
            kernel_size=kernel_size,
            group_width=group_width,
            lam=lam,
            gamma=gamma,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            backend=backend,
            **dd,
        )
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
            cast(ELSASwinStage, stage).set_input_size(stage_input_resolution(grid, i), self.window_size)

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
            cast(ELSASwinStage, stage).grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head with ``num_classes`` outputs (0: none), on the device and in the dtype of the model's
        parameters (also after the head was removed, when the head itself has none to go by)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))
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
        x = self.pos_drop(self.patch_embed(x))
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
        return self.norm(self.layers(self.pos_drop(self.patch_embed(x))))

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


def load_weights(
    model: nn.Module, checkpoint: dict[str, Any], source: str, use_ema: bool = False, strict: bool = True
) -> None:
    """Load a checkpoint's model (or EMA) weights into ``model``, the original's names mapped.

    With ``strict=False`` (fine-tuning), a classifier of another class count is left at its initial values,
    as timm's pretrained loading does, and keys the model lacks or the file lacks are logged.

    Args:
        model (nn.Module): an ELSA-Swin classifier (the original's names are mapped onto it) or any timm
            model (its own names).
        checkpoint (dict): the loaded file (:func:`elsa_swin.load_checkpoint_file`).
        source (str): how messages name the file.
        use_ema (bool): load its EMA weights. Default: False.
        strict (bool): every key of the model and of the file must match. Default: True.

    Raises:
        CheckpointError: the file holds no EMA weights where they were asked for, fits nothing of the model,
            has tensors of other shapes, or (strict) lacks or adds keys.
    """
    state = unwrap_state_dict(checkpoint, use_ema=use_ema, source=source)
    if isinstance(model, ELSASwinTransformer):
        state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head.fc")
    reset = []
    if not strict:
        for k in (f"{classifier}.weight", f"{classifier}.bias"):
            if k in state and k in own and state[k].shape != own[k].shape:
                reset.append((k, state.pop(k).shape[0]))
    mismatched = [
        f"{k} is {tuple(v.shape)} there and {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{source} does not fit {name}: {'; '.join(mismatched[:4])}"
            + (f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
        )
    if not set(state) & set(own):
        sample = ", ".join(list(state)[:3]) or "none"
        raise CheckpointError(
            f"{source} holds no weights of {name}: none of its {len(state)} keys "
            f"(e.g. {sample}) is a parameter or buffer of the model"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(reset)]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source} does not fit {name}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    if reset:
        _logger.warning(
            f"{source}: its classifier has {reset[0][1]} classes, the model "
            f"{own[reset[0][0]].shape[0]}: the classifier ({classifier}) starts from scratch"
        )
    if missing or unexpected:
        _logger.warning(
            f"{source}: keys the file lacks: {missing or 'none'}; keys the model lacks: {unexpected or 'none'}"
        )
    _logger.info(f"loaded {'EMA ' if use_ema else ''}weights from {source}")


def create_from_checkpoint(
    model_name: str,
    checkpoint: dict[str, Any] | None,
    source: str = "the checkpoint",
    num_classes: int | None = None,
    img_size: int | None = None,
    use_ema: bool = False,
) -> nn.Module:
    """``timm.create_model(model_name)`` with a checkpoint's class count and weights.

    Args:
        model_name (str): a timm model name (``elsa_swin_tiny``, or any timm model for its own checkpoints).
        checkpoint (dict, optional): the loaded file (:func:`elsa_swin.load_checkpoint_file`); None keeps
            the model's initial weights.
        source (str): how messages name the file. Default: "the checkpoint".
        num_classes (int, optional): classes of the model. Default: None, the rows of the checkpoint's head,
            else the model's default.
        img_size (int, optional): input size of the model. Default: None, the model's default.
        use_ema (bool): load the checkpoint's EMA weights. Default: False.

    Returns:
        nn.Module: the model, in training mode as timm creates it.

    Raises:
        ValueError: ``model_name`` is not a timm model.
        CheckpointError: (a ValueError) see :func:`load_weights`.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; the ELSA-Swin models are {timm.list_models('elsa_swin*')}")
    if num_classes is None and checkpoint is not None:
        num_classes = head_classes(unwrap_state_dict(checkpoint, use_ema=use_ema, source=source))
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(model_name, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint, source, use_ema=use_ema)
    return model


def _create_elsa_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> ELSASwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(
        ELSASwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
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
def elsa_swin_nano(pretrained: bool = False, **kwargs: Any) -> ELSASwinTransformer:
    """A narrow ELSA-Swin (embed 32, depths 2-2-2-2) for demos and tests; not a published model."""
    args = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), group_width=4)
    return _create_elsa_swin("elsa_swin_nano", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_tiny(pretrained: bool = False, **kwargs: Any) -> ELSASwinTransformer:
    """ELSA-Swin-T, 29M parameters, 82.7% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_width=4)
    return _create_elsa_swin("elsa_swin_tiny", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_small(pretrained: bool = False, **kwargs: Any) -> ELSASwinTransformer:
    """ELSA-Swin-S, 53M parameters, 83.5% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_elsa_swin("elsa_swin_small", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def elsa_swin_base(pretrained: bool = False, **kwargs: Any) -> ELSASwinTransformer:
    """ELSA-Swin-B, 93M parameters, 84.0% ImageNet-1k top-1 (paper)."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_elsa_swin("elsa_swin_base", pretrained=pretrained, **dict(args, **kwargs))
