"""Runner hooks: the one our configs add, so that mmdet's and mmseg's own tools get what ours do, and those
our test tools add for the original's options."""

from typing import TYPE_CHECKING

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .compat import allow_mmengine_checkpoints, write_checkpoints_atomically

if TYPE_CHECKING:
    from mmengine.runner import Runner


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Makes the Runner's checkpoints loadable with ``torch.load(weights_only=True)``
    (:func:`elsa_mm.compat.allow_mmengine_checkpoints`) and written atomically
    (:func:`elsa_mm.compat.write_checkpoints_atomically`), before it saves or loads any.

    Its ``before_run`` comes before the Runner loads ``load_from`` / resumes, in training and testing.
    """

    priority = "VERY_HIGH"

    def before_run(self, runner: "Runner") -> None:
        allow_mmengine_checkpoints()
        write_checkpoints_atomically()


@HOOKS.register_module()
class FuseConvBNHook(Hook):
    """Folds each BatchNorm into the convolution before it (mmcv's ``fuse_conv_bn``) once the checkpoint is
    loaded, before testing: the same outputs, a little faster (det ``tools/test.py --fuse-conv-bn``)."""

    def before_test(self, runner: "Runner") -> None:
        from mmcv.cnn import fuse_conv_bn
        from torch.nn.modules.batchnorm import _BatchNorm

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        before = sum(isinstance(m, _BatchNorm) for m in model.modules())
        fuse_conv_bn(model)
        after = sum(isinstance(m, _BatchNorm) for m in model.modules())
        print_log(f"--fuse-conv-bn: {before - after} of {before} BatchNorm layers folded into convolutions", "current")


@HOOKS.register_module()
class CollectResultsHook(Hook):
    """How the test's processes gather their results for the evaluator (test tools' ``--gpu-collect`` and
    ``--tmpdir``): ``device="gpu"`` through the communication backend, ``"cpu"`` through files in ``tmpdir``
    (a temporary folder when None), for every metric of the test evaluator.

    Args:
        device (str): ``"cpu"`` or ``"gpu"``.
        tmpdir (str, optional): the folder of the files; only with ``device="cpu"``.
    """

    def __init__(self, device: str = "cpu", tmpdir: str | None = None) -> None:
        if device not in ("cpu", "gpu") or (tmpdir is not None and device != "cpu"):
            raise ValueError(f"CollectResultsHook: {device=} {tmpdir=}: a tmpdir goes only with device='cpu'")
        self.device, self.tmpdir = device, tmpdir

    def before_test(self, runner: "Runner") -> None:
        for metric in runner.test_loop.evaluator.metrics:
            metric.collect_device, metric.collect_dir = self.device, self.tmpdir


@HOOKS.register_module()
class AmpValidationHook(Hook):
    """Validates in mixed precision when training does (an ``AmpOptimWrapper``), as the original's apex O1,
    which patched torch's functions for the whole process, did for its validation after each epoch."""

    def before_train(self, runner: "Runner") -> None:
        from mmengine.optim import AmpOptimWrapper, OptimWrapperDict

        wrappers = (
            runner.optim_wrapper.values()
            if isinstance(runner.optim_wrapper, OptimWrapperDict)
            else [runner.optim_wrapper]
        )
        amp = any(isinstance(w, AmpOptimWrapper) for w in wrappers)
        if runner.val_loop is not None:
            runner.val_loop.fp16 = runner.val_loop.fp16 or amp  # a config may ask for it anyway
