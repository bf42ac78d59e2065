# Cascade heads of Swin's Cascade Mask R-CNN: 4 shared convs + 1 fc, GIoU loss on decoded boxes.
cascade_bbox_head = dict(
    type="ConvFCBBoxHead",
    num_shared_convs=4,
    num_shared_fcs=1,
    in_channels=256,
    conv_out_channels=256,
    fc_out_channels=1024,
    roi_feat_size=7,
    num_classes=80,
    reg_class_agnostic=False,
    reg_decoded_bbox=True,
    norm_cfg=dict(type="SyncBN", requires_grad=True),
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    loss_bbox=dict(type="GIoULoss", loss_weight=10.0),
)
elsa_cascade_bbox_heads = [
    dict(
        cascade_bbox_head,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2]),
    ),
    dict(
        cascade_bbox_head,
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.05, 0.05, 0.1, 0.1]
        ),
    ),
    dict(
        cascade_bbox_head,
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.033, 0.033, 0.067, 0.067]
        ),
    ),
]
