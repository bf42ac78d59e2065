"""mmdetection plugin: registers the ELSA-Swin backbone (configs load it with ``custom_imports``)."""
from mmdet.registry import MODELS

from elsa_mm import ELSASwin

MODELS.register_module(module=ELSASwin, force=False)

__all__ = ["ELSASwin"]
