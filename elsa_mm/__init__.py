"""The ELSA-Swin backbone for OpenMMLab (mmdetection 3.x and mmsegmentation 1.x).

Written once here; det/elsa_det and seg/elsa_seg register it in their MODELS registries.
"""
from .backbone import ELSASwin
from .compat import allow_mmengine_checkpoints

allow_mmengine_checkpoints()

__all__ = ["ELSASwin", "allow_mmengine_checkpoints"]
