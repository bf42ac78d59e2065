"""The ELSA operator in mmengine's complexity analysis (``get_model_complexity_info``, which mmdet's and
mmseg's ``tools/analysis_tools/get_flops.py`` use): without a handle it skips the op with a warning and
the FLOPs of every ELSA-Swin come out low."""

from typing import Any

from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import get_shape

from elsa_op.flops import elsa_forward_macs


def elsa_forward_jit_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of one traced ``elsa_op::elsa_forward`` (features, h_attn, ghost_mul, ghost_add,
    kernel_size, dilation, stride)."""
    has_ghost_mul = inputs[2].type().kind() != "NoneType"
    return elsa_forward_macs(get_shape(outputs[0]), inputs[4].toIValue(), has_ghost_mul)


def register_flop_handles() -> None:
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS["elsa_op::elsa_forward"] = elsa_forward_jit_handle
