"""A Runner hook that our configs add, so that mmdet's and mmseg's own tools get what ours do."""

from typing import TYPE_CHECKING

from mmengine.hooks import Hook
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
