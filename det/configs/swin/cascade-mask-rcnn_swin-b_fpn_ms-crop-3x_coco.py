# Cascade Mask R-CNN with Swin-B, 3x schedule, COCO, on the ELSA-Swin recipe: the original's Swin baseline
# configs/swin/cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py
_base_ = "../_base_/cascade-mask-rcnn_swin-t_fpn_ms-crop-1x.py"
model = dict(
    backbone=dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.3),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
train_cfg = dict(max_epochs=36)
# The recipe's warm-up, then x0.1 at epochs 27 and 33.
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type="MultiStepLR", begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
