"""ELSA-Swin for OpenMMLab (mmdetection 3.x and mmsegmentation 1.x).

Importing it registers the dense backbone ``ELSASwin`` in mmengine's root ``MODELS`` registry,
the hooks of :mod:`elsa_mm.hooks` in its root ``HOOKS`` registry and the loops of :mod:`elsa_mm.loops`
in its ``LOOPS`` registry (mmdet's and mmseg's registries search the root's), and
the ELSA operator's FLOP count in mmengine's complexity analysis; configs load it with
``custom_imports=dict(imports=['elsa_mm'])``. It changes nothing else: making mmengine checkpoints
loadable and their writes atomic are explicit calls (:mod:`elsa_mm.compat`).
"""

from .backbone import ELSASwin
from .compat import allow_mmengine_checkpoints, write_checkpoints_atomically
from .flops import register_flop_handles
from .hooks import AmpValidationHook, CollectResultsHook, FuseConvBNHook, SafeCheckpointHook
from .loops import MultiViewTestLoop, MultiViewValLoop

register_flop_handles()

__all__ = [
    "AmpValidationHook",
    "CollectResultsHook",
    "ELSASwin",
    "FuseConvBNHook",
    "MultiViewTestLoop",
    "MultiViewValLoop",
    "SafeCheckpointHook",
    "allow_mmengine_checkpoints",
    "write_checkpoints_atomically",
]
