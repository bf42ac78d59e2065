"""The ELSA attention layer (NHWC in, NHWC out, like timm's Swin blocks). Needs torch only."""

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor

from .functional import BACKENDS, elsa_function

__all__ = ["ELSAAttention", "elsa_layer_op"]


def elsa_layer_op(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    backend: str,
) -> Tensor:
    """The ELSA operator as :class:`ELSAAttention` calls it: positional arguments only, stride 1.

    It is the layer's leaf for FX tracing (timm's ``feature_cls="fx"``, torchvision's
    ``create_feature_extractor``): the traced graph holds one call of it instead of the argument checks
    inside :func:`elsa_function`, and TorchScript compiles that graph (``torch.jit.script`` of an FX-traced
    model), since a scripted call runs the registered operator directly.

    Args:
        features (Tensor[B, C, H, W]): the values, channels-last in the layer.
        h_attn (Tensor[B, G, K*K, H, W]): softmaxed attention per pixel and group.
        ghost_mul (Tensor[C, K, K] | None): multiplicative ghost kernel, already raised to ``lam``.
        ghost_add (Tensor[C, K, K] | None): additive ghost kernel, already scaled by ``gamma``.
        kernel_size (int): window size K.
        dilation (int): window dilation.
        backend (str): ``"kernels"`` or ``"reference"`` (see :func:`elsa_function`); TorchScript runs the
            compiled operator only.

    Returns:
        Tensor[B, C, H, W]: in the features' layout.
    """
    if torch.jit.is_scripting():
        if backend != "kernels":
            raise RuntimeError("a scripted ELSA layer runs the compiled operator only: build it with backend='kernels'")
        # elsa_function's checks and autocast handling are Python only; the layer's arguments always
        # pass the checks, and the ghost kernels take the features' dtype.
        if ghost_mul is not None:
            ghost_mul = ghost_mul.to(features.dtype)
        if ghost_add is not None:
            ghost_add = ghost_add.to(features.dtype)
        return torch.ops.elsa_op.elsa_forward(features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, 1)
    return elsa_function(
        features, h_attn, ghost_mul, ghost_add, kernel_size=kernel_size, dilation=dilation, backend=backend
    )


# FX tracing keeps the operator as one call node (a leaf) instead of tracing into its argument checks.
torch.fx.wrap("elsa_layer_op")


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


def _restore_pointwise_layout(module: nn.Module, incompatible_keys: Any) -> None:
    cast(ELSAAttention, module)._pointwise_weights_in_grad_layout()


class ELSAAttention(nn.Module):
    """Enhanced local self-attention: Hadamard attention plus a ghost head.

    q, k, v come from a 1x1 conv; the attention of each pixel over its K x K neighbourhood is produced
    from the Hadamard product q * k * scale by a grouped K x K conv, GELU and a 1x1 conv to
    ``num_heads * K * K`` logits, softmaxed over the K * K taps. The ghost head adds static per-channel
    kernels to it: ``weight = ghost_mul ** lam * attention + ghost_add * gamma``, and the weighted sum of v
    over the window is taken by :func:`elsa_op.elsa_function`.

    Args:
        dim (int): channels in and out.
        num_heads (int): attention heads; each head's attention is shared by ``dim // num_heads`` channels.
        kernel_size (int): window size K (odd). Default: 7.
        dilation (int): window dilation. Default: 1.
        group_width (int): channels per group of the K x K conv that makes the attention. Default: 8.
        qkv_bias (bool): bias of the q/k/v projection. Default: True.
        qk_scale (float | None): scale of q * k; None means ``(dim // num_heads) ** -0.5``. Default: None.
        lam (float): exponent of the multiplicative ghost kernel ``ghost_mul`` (Tensor[C, K, K]); 0 leaves it
            out. Default: 0.
        gamma (float): scale of the additive ghost kernel ``ghost_add`` (Tensor[C, K, K]); 0 leaves it out.
            Default: 1.
        attn_drop (float): dropout on the attention. Default: 0.
        proj_drop (float): dropout after the output projection. Default: 0.
        backend (str): ``"kernels"`` (the compiled operator) or ``"reference"`` (pure PyTorch, slow; for
            checking and for machines without the compiled library). Default: ``"kernels"``.
        device (torch.device | str | None): where to create the parameters. Default: None.
        dtype (torch.dtype | None): dtype of the parameters. Default: None.

    Shape:
        x: Tensor[B, H, W, C] -> Tensor[B, H, W, C].
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dd: dict[str, Any] = dict(device=device, dtype=dtype)
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
        self._pointwise_weights_in_grad_layout()
        # load_state_dict(..., assign=True) puts the checkpoint's own tensors in place of the weights; the
        # hook runs after the convolutions below this layer have loaded theirs.
        self.register_load_state_dict_post_hook(_restore_pointwise_layout)

    def _pointwise_weights_in_grad_layout(self) -> None:
        """Give the 1x1 conv weights ([O, I, 1, 1]) the strides of the gradients they get.

        The layer's convolutions run channels-last, so their weight gradients come channels-last. For the
        K x K conv autograd copies such a gradient into the weight's layout; for a 1x1 weight both layouts
        are the same memory and differ only in the strides of the two unit dimensions, which autograd lets
        through but DistributedDataParallel does not ("Grad strides do not match bucket view strides", and
        a copy per step). Weights with channels-last strides get gradients with their own strides; the
        values, the state_dict and what checkpoints hold are unchanged (both layouts are contiguous).
        """
        for conv in (self.pre_proj, cast(nn.Conv2d, self.attn[2])):
            weight = conv.weight
            if weight.stride() != _channels_last_strides(weight.shape):
                weight.data = weight.data.clone(memory_format=torch.channels_last)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ELSAAttention":
        # .to(), .float(), .to(memory_format=...) and to_empty() go through here; the last two may give
        # the 1x1 weights other strides.
        super()._apply(fn, recurse)
        self._pointwise_weights_in_grad_layout()
        return self

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
        # the last dimension, and the operator reads v and the attention in place and returns
        # channels-last output that post_proj takes without a copy.
        q, k, v = self.pre_proj(x.permute(0, 3, 1, 2)).split((self.dim_qk, self.dim_qk, C), dim=1)
        # ELSA-Swin's blocks use scale 1 (the attention conv learns it): skip a pass over q * k there.
        qk = q * k if self.scale == 1 else q * k * self.scale
        logits = self.attn(qk).permute(0, 2, 3, 1).reshape(B, H, W, self.num_heads, K * K)
        attn = self.attn_drop(logits.softmax(dim=-1)).permute(0, 3, 4, 1, 2)
        ghost_mul = self.ghost_mul**self.lam if self.ghost_mul is not None else None
        ghost_add = self.ghost_add * self.gamma if self.ghost_add is not None else None
        x = elsa_layer_op(v, attn, ghost_mul, ghost_add, K, self.dilation, self.backend)
        x = self.post_proj(x.permute(0, 2, 3, 1))
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, lam={self.lam}, gamma={self.gamma}, backend={self.backend!r}"
        )
