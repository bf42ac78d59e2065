"""Pieces shared by train.py, validate.py and the other classification tools: native mixed precision
(apex's flag is an alias) and the batched forward pass over a loader."""

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

_logger = logging.getLogger(__name__)


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
