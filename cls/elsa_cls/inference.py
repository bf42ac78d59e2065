"""Pieces shared by train.py, validate.py and the other classification tools: loading weights into a
model, native mixed precision (apex's flag is an alias) and the batched forward pass over a loader."""

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from elsa_swin import ELSASwinTransformer, checkpoint_filter_fn
from elsa_swin.checkpoint import CheckpointError, unwrap_state_dict

_logger = logging.getLogger(__name__)


def load_weights(
    model: torch.nn.Module, checkpoint: dict[str, Any], source: str, use_ema: bool = False, strict: bool = True
) -> None:
    """Load a checkpoint's model (or EMA) weights into ``model``, the original's names mapped.

    With ``strict=False`` (fine-tuning from ``--initial-checkpoint``), a classifier of another class count
    is left at its initial values, as timm's pretrained loading does, and keys the model lacks or the file
    lacks are logged. Raises :class:`CheckpointError` when the file fits nothing of the model, when shapes
    differ elsewhere, or (strict) when any key is missing or unexpected.
    """
    if use_ema and not any(isinstance(checkpoint.get(k), dict) for k in ("state_dict_ema", "model_ema")):
        raise CheckpointError(f"{source} holds no EMA weights (no state_dict_ema), but EMA weights were asked for")
    state = unwrap_state_dict(checkpoint, use_ema=use_ema)
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


def resolve_amp(args, device: torch.device) -> tuple[Callable, torch.dtype]:
    """(context factory, dtype) for --amp/--apex-amp/--native-amp and --amp-dtype.

    The dtype defaults to float16 on CUDA and bfloat16 elsewhere; without AMP the context does nothing.
    """
    if args.apex_amp or args.native_amp:
        _logger.warning("--apex-amp/--native-amp: using native torch.amp (NVIDIA apex is not needed)")
        args.amp = True
    dtype = (
        getattr(torch, args.amp_dtype)
        if args.amp_dtype
        else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    )
    if not args.amp:
        return nullcontext, dtype
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader, device: torch.device, amp_ctx: Callable, channels_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (float32 logits, target) for each batch of ``loader``, the model in eval mode."""
    model.eval()
    for x, target in loader:
        x, target = x.to(device), target.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            logits = model(x)
        yield logits.float(), target
