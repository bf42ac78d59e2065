# Mask R-CNN with Swin-T, 1x schedule, COCO, on the ELSA-Swin recipe: the original's Swin baseline
# configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py
_base_ = "../_base_/mask-rcnn_swin-t_fpn_ms-crop-1x.py"
model = dict(backbone=dict(drop_path_rate=0.1))
