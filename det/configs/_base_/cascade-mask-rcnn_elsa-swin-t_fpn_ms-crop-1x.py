# Cascade Mask R-CNN (mmdet's) with the ELSA-Swin-T backbone and recipe, Swin's 4conv1fc GIoU heads, 1x.
_base_ = [
    "mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py",
    "./elsa_swin_recipe.py",
    "./cascade_4conv1fc_giou.py",
]
model = dict(
    backbone={{_base_.elsa_backbone}},
    neck=dict(in_channels={{_base_.elsa_neck_channels}}),
    roi_head=dict(bbox_head={{_base_.elsa_cascade_bbox_heads}}),
)
train_dataloader = dict(dataset=dict(pipeline={{_base_.elsa_train_pipeline}}))
optim_wrapper = {{_base_.elsa_optim_wrapper}}
train_cfg = dict(max_epochs=12)
param_scheduler = {{_base_.elsa_schedule_1x}}
# The published models were trained with 16 images per step (8 GPUs x 2): on fewer GPUs, --auto-scale-lr
# scales the learning rate by (GPUs x 2) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
