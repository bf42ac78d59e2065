"""timm's CheckpointSaver (last, model_best and the best ``--checkpoint-hist`` epochs, with its history
kept in each checkpoint for ``--resume``), writing every file atomically and storing the class names."""

import os
from collections.abc import Sequence
from typing import Any

from timm.utils import CheckpointSaver
from timm.utils.model import get_state_dict

from elsa_swin.files import atomic_link, atomic_torch_save


class RunSaver(CheckpointSaver):
    """timm's saver whose files are never half-written: ``last.pth.tar`` is replaced in one rename (timm's
    own saver unlinks it first, so a kill in between loses it) and copies are replaced atomically too.

    Args:
        class_names: the label order, stored with every checkpoint as ``class_names`` (validate.py and
            predict.py read it). Other arguments: timm's ``CheckpointSaver``.
    """

    def __init__(self, *args, class_names: Sequence[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_names = list(class_names) if class_names is not None else None
        # The run's per-epoch summary rows, saved with each checkpoint: a run resumed after a kill that
        # came between the checkpoint and summary.csv rebuilds summary.csv from them.
        self.summary: list[dict[str, Any]] = []

    def _save(self, save_path, epoch, metric=None, resume_step=None):
        state = {
            "epoch": epoch,
            "arch": self.args.model if self.args is not None else type(self.model).__name__.lower(),
            "state_dict": get_state_dict(self.model, self.unwrap_fn),
            "optimizer": self.optimizer.state_dict(),
            "version": 2,  # the epoch stored is the one just finished
            # a partial epoch is nothing for --resume to keep as checkpoint-<epoch> or model_best
            "saver": self.state_dict(*((None, None) if resume_step is not None else (epoch, metric))),
        }
        if self.args is not None:
            state["args"] = self.args
        if self.class_names is not None:
            state["class_names"] = self.class_names
        state["summary"] = self.summary
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state["state_dict_ema"] = get_state_dict(self.model_ema, self.unwrap_fn)
        if metric is not None:
            state["metric"] = metric
        if resume_step is not None:
            state["resume_step"] = resume_step
        atomic_torch_save(state, save_path)

    def save_checkpoint(self, epoch: int, metric: float | None = None):
        """Save ``last`` (atomically), then keep it as ``checkpoint-<epoch>`` and ``model_best`` where it earns
        a place, as timm's saver does. Returns (best metric, best epoch)."""
        last = os.path.join(self.checkpoint_dir, "last" + self.extension)
        self._save(last, epoch, metric)  # atomic: no tmp.pth.tar to rename as timm does
        self._keep(epoch, metric, last)
        return (None, None) if self.best_metric is None else (self.best_metric, self.best_epoch)

    def save_partial(self, resume_step: dict) -> None:
        """Save ``last`` (atomically) in the middle of epoch ``resume_step["epoch"]``: a checkpoint that
        ``--resume`` continues from step ``resume_step["step"]`` of that epoch. It joins neither the kept
        checkpoints nor ``model_best``, whose epochs are whole."""
        last = os.path.join(self.checkpoint_dir, "last" + self.extension)
        self._save(last, resume_step["epoch"] - 1, resume_step=resume_step)

    def resume(self, checkpoint: dict, path: str) -> None:
        """Continue the bookkeeping of the run that wrote ``checkpoint`` (read from ``path``, in this run's
        folder): its history and best metric, and the copies its last save may not have finished when the
        run was stopped, so that ``model_best`` stays the best epoch of the whole run."""
        state = checkpoint.get("saver")
        if not state:
            return
        epoch, metric = state.get("pending", (None, None))
        self.load_state_dict(dict(state, pending=(None, None)))
        if epoch is not None:
            self._keep(epoch, metric, path)

    def _keep(self, epoch: int, metric: float | None, source: str) -> None:
        save_path = self._checkpoint_path(epoch)
        if save_path not in [f for f, _ in self.checkpoint_files]:
            worst = self.checkpoint_files[-1] if self.checkpoint_files else None
            if (
                len(self.checkpoint_files) < self.max_history
                or worst[1] is None
                or (metric is not None and self.cmp(metric, worst[1]))
            ):
                if len(self.checkpoint_files) >= self.max_history:
                    self._cleanup_checkpoints(1)
                self._duplicate(source, save_path)
                self._track_checkpoint(save_path, epoch, metric, update_best_file=False)
        if metric is not None and (
            self.best_epoch == epoch or self.best_metric is None or self.cmp(metric, self.best_metric)
        ):
            self.best_epoch, self.best_metric = epoch, metric
            self._duplicate(source, os.path.join(self.checkpoint_dir, "model_best" + self.extension))

    def _replace(self, src, dst):
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        atomic_link(src, dst)
