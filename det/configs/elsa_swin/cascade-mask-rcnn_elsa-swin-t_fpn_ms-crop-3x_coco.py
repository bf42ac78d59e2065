# Cascade Mask R-CNN with ELSA-Swin-T, 3x schedule, COCO (the published model: 86M parameters).
_base_ = "../_base_/cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x.py"
model = dict(backbone=dict(drop_path_rate=0.2))
train_cfg = dict(max_epochs=36)
# The recipe's warm-up, then x0.1 at epochs 27 and 33.
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type="MultiStepLR", begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
