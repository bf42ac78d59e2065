# Cascade Mask R-CNN with ELSA-Swin-T, 1x schedule, COCO (the published model: 86M parameters).
_base_ = "../_base_/cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x.py"
model = dict(backbone=dict(drop_path_rate=0.0))
