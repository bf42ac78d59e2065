# Cascade Mask R-CNN (mmdet's) with the ELSA-Swin-T backbone and the recipe, 1x schedule, and Swin's cascade
# heads: 4 shared convs (SyncBN) + 1 fc, GIoU loss x10 on decoded boxes, one target std per stage.
_base_ = ["mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py", "./elsa_swin_recipe.py"]
model = dict(
    backbone=dict(
        _delete_=True,
        type="ELSASwin",
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        group_width=4,
        drop_path_rate=0.2,
        use_checkpoint=False,
        out_indices=(0, 1, 2, 3),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(
        bbox_head=[
            dict(
                type="ConvFCBBoxHead",
                num_shared_convs=4,
                num_shared_fcs=1,
                in_channels=256,
                conv_out_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
                reg_class_agnostic=False,
                reg_decoded_bbox=True,
                norm_cfg=dict(type="SyncBN", requires_grad=True),
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
            )
            for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
        ]
    ),
)
