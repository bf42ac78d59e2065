"""Argument checks of the ELSA operator, gathered in one place so that every entry point reports bad
input the same way: a Python exception that names the argument and shows its value."""

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The kernels' bounds (elsa_common.h): every size and offset computation stays inside int64.
MAX_KERNEL_SIZE = 2**15
MAX_DILATION_OR_STRIDE = 2**31 - 1


def ghost_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in, and in which they return ghost-kernel gradients: float64 for
    float64, else float32. Ghost kernels may come in it beside half or bfloat16 features (mixed precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_positive_int(name: str, value: int, largest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")
    if value > largest:
        raise ValueError(f"{name} must be at most {largest}, got {name}={value}")


def check_elsa_args(
    features: Tensor,
    h_attn: Tensor,
    ghost_mul: Tensor | None,
    ghost_add: Tensor | None,
    kernel_size: int,
    dilation: int,
    stride: int,
) -> None:
    """Raises TypeError/ValueError for anything the kernels cannot take (see elsa_function)."""
    _check_positive_int("kernel_size", kernel_size, MAX_KERNEL_SIZE)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got kernel_size={kernel_size}")
    _check_positive_int("dilation", dilation, MAX_DILATION_OR_STRIDE)
    _check_positive_int("stride", stride, MAX_DILATION_OR_STRIDE)

    named = {"features": features, "h_attn": h_attn, "ghost_mul": ghost_mul, "ghost_add": ghost_add}
    for name, t in named.items():
        if t is None and name.startswith("ghost"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor ({', '.join(map(str, SUPPORTED_DTYPES))}), got {t.dtype}"
            )
        if t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}")
        if t.dtype != features.dtype and not (
            name.startswith("ghost") and t.dtype == ghost_accumulation_dtype(features.dtype)
        ):
            allowed = (
                "" if features.dtype == ghost_accumulation_dtype(features.dtype) else " (ghost kernels may be float32)"
            )
            raise TypeError(
                f"{name} has dtype {t.dtype} but features have {features.dtype}; cast them to one dtype{allowed}"
            )

    if features.dim() != 4:
        raise ValueError(f"features must be 4-D [B, C, H, W], got {features.shape=}")
    B, C, H, W = features.shape
    if min(C, H, W) == 0:  # an empty batch is fine: empty results, as for convolutions
        raise ValueError(f"features must have channels and pixels, got {features.shape=}")
    KK = kernel_size * kernel_size
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1

    if h_attn.dim() not in (4, 5):
        raise ValueError(f"h_attn must be [B, K*K, Ho, Wo] or [B, G, K*K, Ho, Wo], got {h_attn.shape=}")
    G = h_attn.shape[1] if h_attn.dim() == 5 else 1
    expected = (B, G, KK, Ho, Wo) if h_attn.dim() == 5 else (B, KK, Ho, Wo)
    if tuple(h_attn.shape) != expected:
        raise ValueError(
            f"h_attn must have shape {list(expected)} for features of shape {list(features.shape)}, "
            f"kernel_size={kernel_size} and stride={stride}; got {h_attn.shape=}"
        )
    if G == 0 or C % G != 0:
        raise ValueError(f"channels C={C} must be divisible by the number of attention groups G={G} ({h_attn.shape=})")

    for name in ("ghost_mul", "ghost_add"):
        t = named[name]
        if t is None:
            continue
        ok = (t.dim() == 3 and tuple(t.shape) == (C, kernel_size, kernel_size)) or (
            t.dim() == 4 and tuple(t.shape) == (B, C, kernel_size, kernel_size)
        )
        if not ok:
            raise ValueError(
                f"{name} must have shape [C, K, K]=[{C}, {kernel_size}, {kernel_size}] or "
                f"[B, C, K, K]=[{B}, {C}, {kernel_size}, {kernel_size}], got {t.shape=}"
            )
