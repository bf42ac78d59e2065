"""mmengine checkpoints that load with torch.load's safety on, and are never half-written.

Writing: mmengine's local storage backend opens the final file and writes into it, so a kill or a full
disk leaves a partial ``iter_N.pth`` under its final name (which ``--resume`` then fails on).
:func:`write_checkpoints_atomically` registers a local backend that writes a temporary file in the
same folder, fsyncs it and renames it into place, and says "no space left on <folder>" when the disk
is full, keeping the previous file.

Loading with torch >= 2.6:

torch.load defaults to weights_only=True since 2.6. mmengine 0.10.7's Runner stores numpy arrays, scalars
and dtypes (and its HistoryBuffer objects) in a checkpoint's message hub, which that loader refuses, so
mmengine cannot load the checkpoints it wrote. Two changes, made by :func:`allow_mmengine_checkpoints`
(which our tools call, and which :class:`elsa_mm.SafeCheckpointHook`, in our configs' ``custom_hooks``,
calls for mmdet's and mmseg's own tools), make them loadable with weights_only=True:

- those numpy types and HistoryBuffer are allowed as safe globals;
- HistoryBuffer no longer pickles its built-in statistics functions (min, max, current, mean). Pickle
  refers to them through ``getattr``, which must never be allowed; __setstate__ re-registers them anyway.
  Statistics registered by users are still saved.
"""

from pathlib import Path

import torch
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging.history_buffer import HistoryBuffer

from elsa_swin.checkpoint import SAFE_GLOBALS
from elsa_swin.files import atomic_write_bytes

_DEFAULT_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_getstate(self: HistoryBuffer) -> dict:
    state = dict(self.__dict__)
    custom = {k: v for k, v in self._statistics_methods.items() if k not in _DEFAULT_STATISTICS}
    state.pop("statistics_methods", None)
    if custom:
        state["statistics_methods"] = custom
    return state


def mmengine_safe_globals() -> list:
    """The types an mmengine Runner checkpoint holds besides tensors and containers."""
    return [HistoryBuffer, *SAFE_GLOBALS]


def allow_mmengine_checkpoints() -> None:
    """Make mmengine's checkpoints (those written from now on, and those written by our tools) loadable
    by ``torch.load(weights_only=True)`` in this process."""
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    torch.serialization.add_safe_globals(mmengine_safe_globals())


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing through a temporary file and a rename."""

    def put(self, obj: bytes, filepath: str | Path) -> None:
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(filepath, obj)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = "utf-8") -> None:
        self.put(obj.encode(encoding), filepath)


def write_checkpoints_atomically() -> None:
    """Make mmengine write local files (checkpoints among them) atomically in this process."""
    register_backend("local", AtomicLocalBackend, force=True, prefixes="")
