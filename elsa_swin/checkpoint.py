"""Reading checkpoint files safely, and mapping the original ELSA code's names onto our models.

Files are read with ``torch.load(weights_only=True)`` and an explicit allow-list of the few
non-tensor types that training checkpoints hold (timm's ``argparse.Namespace`` of training
arguments, numpy scalars and arrays), or as ``.safetensors``. Nothing else is ever unpickled: a file
that needs another global is refused with a message that names it.

The original downsamples at the end of a stage (timm at the start of the next), stores both ghost
kernels of a layer in one packed ``ghost_head`` tensor, and names its window attention
pre_proj/post_proj/rb, projecting to (v, q, k) and indexing its bias table by the key - query offset.
Renames and reorderings happen here, once, for every model built from
:class:`elsa_swin.blocks.ELSASwinStage`.
"""

import argparse
import importlib
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.swin_transformer import WindowAttention

from elsa_op import ELSAAttention

__all__ = ["CheckpointError", "SAFE_GLOBALS", "load_checkpoint_file", "unwrap_state_dict", "map_original_names"]

_WINDOW_ATTN_RENAMES = {
    ".attn.pre_proj.": ".attn.qkv.",
    ".attn.post_proj.": ".attn.proj.",
    ".attn.rb": ".attn.relative_position_bias_table",
}
_REBUILT_BUFFERS = ("relative_position_index", "relative_id", "attn_mask")

# numpy's pickled arrays and scalars name these (numpy._core is private, hence looked up by name).
_np_multiarray: Any = importlib.import_module("numpy._core.multiarray")

# What timm's and the original's training checkpoints hold besides tensors and plain containers.
SAFE_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    _np_multiarray._reconstruct,
    _np_multiarray.scalar,
    *sorted({type(np.dtype(t)) for t in np.sctypeDict.values()}, key=lambda c: c.__name__),
]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe to unpickle, or does not fit the model."""


def load_checkpoint_file(path: str | Path, extra_safe_globals: Iterable[Any] = ()) -> dict[str, Any]:
    """The contents of a ``.safetensors`` file, or of a torch checkpoint read with ``weights_only=True``
    and :data:`SAFE_GLOBALS` (plus ``extra_safe_globals``). Raises :class:`CheckpointError` with a
    one-line message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is not a readable .safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_safe_globals]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global '?([\w.]+)", str(e))
        what = f"it asks to unpickle {found.group(1)}, which" if found else "it holds an object that"
        raise CheckpointError(
            f"refusing to load checkpoint {path}: {what} is not a tensor, a plain container or one of the "
            "allowed checkpoint types (argparse.Namespace, numpy scalars and arrays), and unpickling it "
            "could run code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint ({first})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint


def unwrap_state_dict(
    checkpoint: dict[str, Any], use_ema: bool = False, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The model's tensors out of a training checkpoint, without DDP's ``module.`` prefix.

    Args:
        checkpoint (dict): a loaded checkpoint: a training checkpoint (``state_dict``/``model``, with
            ``state_dict_ema``/``model_ema`` when it kept EMA weights) or a bare state dict.
        use_ema (bool): take the EMA weights. Default: False.
        source (str): how error messages name the checkpoint. Default: "the checkpoint".

    Returns:
        dict[str, Tensor]: the state dict.

    Raises:
        CheckpointError: ``use_ema`` and the checkpoint holds no EMA weights.
    """
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    else:
        if use_ema:
            raise CheckpointError(f"{source} holds no EMA weights (state_dict_ema or model_ema)")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count of a classifier's state dict: the rows of its head (timm's ``head.fc.weight`` or
    the original's ``head.weight``); None for a state dict without a head."""
    head = next((state_dict[k] for k in ("head.fc.weight", "head.weight") if k in state_dict), None)
    return int(head.shape[0]) if head is not None else None


def _split_ghost_head(key: str, packed: torch.Tensor, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The original's packed ``ghost_head`` ((2, 1, C, K, K) with both kernels, (1, C, K, K) with one) as
    our ``ghost_mul`` / ``ghost_add``; a layer the model lacks keeps the packed key (reported unexpected)."""
    prefix = key[: -len("ghost_head")]
    try:
        attn = model.get_submodule(prefix.rstrip("."))
    except AttributeError:
        return {key: packed}
    if not isinstance(attn, ELSAAttention):
        return {key: packed}
    present = [n for n in ("ghost_mul", "ghost_add") if getattr(attn, n) is not None]
    if packed.dim() == 5 and len(present) == 2:
        return {prefix + "ghost_mul": packed[0, 0], prefix + "ghost_add": packed[1, 0]}
    if packed.dim() == 4 and len(present) == 1:
        return {prefix + present[0]: packed[0]}
    return {key: packed}  # lam / gamma of the checkpoint and the model differ: reported as unexpected


def map_original_names(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename (and reorder) the original's keys onto ``model``; our own checkpoints pass unchanged apart
    from the buffers the model rebuilds. Bias tables of another window size are resized."""
    original_layout = "layers.0.downsample.reduction.weight" in state_dict
    window_attn = {name for name, m in model.named_modules() if isinstance(m, WindowAttention)}
    out = {}
    for k, v in state_dict.items():
        if k.endswith(_REBUILT_BUFFERS):
            continue
        if k.endswith("ghost_head"):
            out.update(_split_ghost_head(k, v, model))
            continue
        if original_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            if k.split(".attn.")[0] + ".attn" in window_attn:
                for old, new in _WINDOW_ATTN_RENAMES.items():
                    k = k.replace(old, new)
                if ".attn.qkv." in k:
                    v = torch.cat(v.chunk(3)[1:] + v.chunk(3)[:1])  # (v, q, k) -> (q, k, v)
                if k.endswith("relative_position_bias_table"):
                    # (heads, positions) by key - query -> (positions, heads) by query - key: reversed order
                    v = v.t().flip(0)
        if k.endswith("relative_position_bias_table") and k.rsplit(".", 1)[0] in window_attn:
            attn = cast(WindowAttention, model.get_submodule(k.rsplit(".", 1)[0]))
            if v.shape != attn.relative_position_bias_table.shape:
                v = resize_rel_pos_bias_table(
                    v, new_window_size=attn.window_size, new_bias_shape=attn.relative_position_bias_table.shape
                )
        out[k] = v
    return out
