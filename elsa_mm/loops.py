"""Validation and test loops that score an image over several views (multi-scale testing) with the model
being trained or tested.

mmengine runs several views of an image only through a test-time augmentation model (mmseg's
``SegTTAModel``), which the test tools put in place of the model; in-training validation has no such
switch. These loops take both pipelines: a batch of single views goes to the model as in mmengine's loops,
a batch of several views (a ``TestTimeAug`` pipeline) goes through the test-time augmentation model built
around the model, which averages the views' class probabilities. The original's ADE20K validation and
default test ran six scales this way.
"""

from typing import Any

import torch
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import LOOPS, MODELS
from mmengine.runner import TestLoop, ValLoop
from mmengine.runner.amp import autocast
from mmengine.runner.loops import _update_losses


def is_multi_view(data_batch: Any) -> bool:
    """Whether a collated batch holds several views of each image (a ``TestTimeAug`` pipeline)."""
    inputs = data_batch.get("inputs") if isinstance(data_batch, dict) else None
    return isinstance(inputs, list | tuple) and len(inputs) > 0 and isinstance(inputs[0], list | tuple)


class _MultiViewSteps:
    """What the validation and test loops share: ``stage`` ("val" or "test") names their hooks, model step
    and loss attribute as mmengine's loops name them."""

    runner: Any
    evaluator: Any
    fp16: bool
    stage: str

    def __init__(
        self, runner: Any, dataloader: Any, evaluator: Any, fp16: bool = False, tta_model: dict | None = None
    ) -> None:
        super().__init__(runner, dataloader, evaluator, fp16)  # type: ignore[call-arg]
        self.tta_model = dict(tta_model or dict(type="SegTTAModel"))
        self._tta: BaseTTAModel | None = None

    def _predict(self, data_batch: Any, step: str) -> list:
        model = self.runner.model
        if isinstance(model, BaseTTAModel) or not is_multi_view(data_batch):
            return getattr(model, step)(data_batch)
        module = model.module if is_model_wrapper(model) else model
        if self._tta is None or self._tta.module is not module:
            self._tta = MODELS.build(dict(self.tta_model, module=module))
        return self._tta.test_step(data_batch)

    @torch.no_grad()
    def run_iter(self, idx: int, data_batch: Any) -> None:
        self.runner.call_hook(f"before_{self.stage}_iter", batch_idx=idx, data_batch=data_batch)
        with autocast(enabled=self.fp16):
            outputs = self._predict(data_batch, f"{self.stage}_step")
        loss_name = f"{self.stage}_loss"
        outputs, losses = _update_losses(outputs, getattr(self, loss_name))
        setattr(self, loss_name, losses)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(f"after_{self.stage}_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)


@LOOPS.register_module()
class MultiViewValLoop(_MultiViewSteps, ValLoop):
    """mmengine's ``ValLoop`` that also takes several views of each image (see the module's description).

    Args:
        runner (Runner): as mmengine's ``ValLoop``.
        dataloader (DataLoader or dict): as mmengine's ``ValLoop``.
        evaluator (Evaluator, dict or list): as mmengine's ``ValLoop``.
        fp16 (bool): run the model under autocast. Default: False.
        tta_model (dict, optional): the test-time augmentation model that merges the views, built around
            the model. Default: ``dict(type="SegTTAModel")``.
    """

    stage = "val"


@LOOPS.register_module()
class MultiViewTestLoop(_MultiViewSteps, TestLoop):
    """mmengine's ``TestLoop`` that also takes several views of each image; arguments as
    :class:`MultiViewValLoop`'s."""

    stage = "test"
