"""Importing this package registers the ELSA-Swin models with timm."""
from .elsa_swin import ELSASwin, checkpoint_filter_fn, unwrap_state_dict

__all__ = ["ELSASwin", "checkpoint_filter_fn", "unwrap_state_dict"]
