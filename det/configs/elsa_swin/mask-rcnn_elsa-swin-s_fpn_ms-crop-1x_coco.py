# Mask R-CNN with ELSA-Swin-S, 1x schedule, COCO (the published model: 72M parameters).
_base_ = "../_base_/mask-rcnn_elsa-swin-t_fpn_ms-crop-1x.py"
model = dict(backbone=dict(depths=[2, 2, 18, 2], group_width=8, drop_path_rate=0.2))
