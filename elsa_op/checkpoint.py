"""Loading checkpoints of the original ELSA code into our models (classifier and dense backbone).

The original downsamples at the end of a stage (timm at the start of the next), and its window
attention is named pre_proj/post_proj/rb, projects to (v, q, k) and indexes its bias table by the
key - query offset. Renames and reorderings happen here, once, for every model built from
:class:`elsa_op.swin_stage.ELSASwinStage`.
"""
import re
from typing import Any, Dict

import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.swin_transformer import WindowAttention

_WINDOW_ATTN_RENAMES = {".attn.pre_proj.": ".attn.qkv.", ".attn.post_proj.": ".attn.proj.", ".attn.rb": ".attn.relative_position_bias_table"}
_REBUILT_BUFFERS = ("relative_position_index", "relative_id", "attn_mask")


def unwrap_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model's tensors out of a training checkpoint: ``state_dict_ema``/``model_ema`` if asked and
    present, else ``state_dict``/``model``/the dict itself, without DDP's ``module.`` prefix."""
    keys = ("state_dict_ema", "model_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def map_original_names(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename (and reorder) the original's keys onto ``model``; our own checkpoints pass unchanged apart
    from the buffers the model rebuilds. Bias tables of another window size are resized."""
    original_layout = "layers.0.downsample.reduction.weight" in state_dict
    window_attn = {name for name, m in model.named_modules() if isinstance(m, WindowAttention)}
    out = {}
    for k, v in state_dict.items():
        if k.endswith(_REBUILT_BUFFERS):
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
            attn = model.get_submodule(k.rsplit(".", 1)[0])
            if v.shape != attn.relative_position_bias_table.shape:
                v = resize_rel_pos_bias_table(v, new_window_size=attn.window_size,
                                              new_bias_shape=attn.relative_position_bias_table.shape)
        out[k] = v
    return out
