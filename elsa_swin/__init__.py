"""ELSA-Swin: Swin Transformer with ELSA in its first three stages.

Importing the package registers the classifiers ``elsa_swin_{nano,tiny,small,base}`` with timm
(``timm.create_model('elsa_swin_tiny')``). The blocks and stages (:mod:`elsa_swin.blocks`, built by
:func:`build_stages`) are shared with the dense backbone of :mod:`elsa_mm`; :mod:`elsa_swin.checkpoint` reads checkpoint files safely
and maps the original code's names onto both.
"""

from .blocks import RENAMED_ARGS, ELSABlock, ELSASwinStage, PaddedWindowBlock, build_stages
from .checkpoint import CheckpointError, head_classes, load_checkpoint_file, map_original_names, unwrap_state_dict
from .classifier import ELSASwinTransformer, checkpoint_filter_fn, create_from_checkpoint, load_weights

__all__ = [
    "RENAMED_ARGS",
    "CheckpointError",
    "ELSABlock",
    "ELSASwinStage",
    "ELSASwinTransformer",
    "PaddedWindowBlock",
    "build_stages",
    "checkpoint_filter_fn",
    "create_from_checkpoint",
    "head_classes",
    "load_checkpoint_file",
    "load_weights",
    "map_original_names",
    "unwrap_state_dict",
]
