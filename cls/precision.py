"""Mixed precision shared by train.py and validate.py: native torch.amp, with apex's flag as an alias."""
import logging
from contextlib import nullcontext
from typing import Callable, Tuple

import torch

_logger = logging.getLogger(__name__)


def resolve_amp(args, device: torch.device) -> Tuple[Callable, torch.dtype]:
    """(context factory, dtype) for --amp/--apex-amp/--native-amp and --amp-dtype.

    The dtype defaults to float16 on CUDA and bfloat16 elsewhere; without AMP the context does nothing.
    """
    if args.apex_amp or args.native_amp:
        _logger.warning("--apex-amp/--native-amp: using native torch.amp (NVIDIA apex is not needed)")
        args.amp = True
    dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    if not args.amp:
        return nullcontext, dtype
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype
