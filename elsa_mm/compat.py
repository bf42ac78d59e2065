"""Loading mmengine checkpoints with torch >= 2.6 without turning torch.load's safety off.

torch.load defaults to weights_only=True since 2.6. mmengine 0.10.7's Runner stores numpy arrays, scalars
and dtypes (and its HistoryBuffer objects) in a checkpoint's message hub, which that loader refuses, so
mmengine cannot load the checkpoints it wrote. Two changes make them loadable with weights_only=True:

- those numpy types and HistoryBuffer are allowed as safe globals;
- HistoryBuffer no longer pickles its built-in statistics functions (min, max, current, mean). Pickle
  refers to them through ``getattr``, which must never be allowed; __setstate__ re-registers them anyway.
  Statistics registered by users are still saved.
"""
import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

_DEFAULT_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_getstate(self) -> dict:
    state = dict(self.__dict__)
    custom = {k: v for k, v in self._statistics_methods.items() if k not in _DEFAULT_STATISTICS}
    state.pop("statistics_methods", None)
    if custom:
        state["statistics_methods"] = custom
    return state


def allow_mmengine_checkpoints() -> None:
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    dtype_classes = {type(np.dtype(t)) for t in np.sctypeDict.values()}
    torch.serialization.add_safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar,
        *dtype_classes,
    ])
